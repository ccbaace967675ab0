"""The SoundStream codec as a trainable model: generator and discriminators trained as a GAN on one trainer.

Parameters are {'generator': ..., 'discriminator': ...}; the quantizer's codebooks are state (the 'quantizer'
collection, updated by EMA). One loss serves both players: gradients are kept apart with stop_gradient, so

  total = generator loss (discriminator parameters frozen) + discriminator loss (reconstruction frozen)

gives each part exactly its own gradient in one backward pass, and `optimizers.create_gan_optimizer` applies
each part's optimizer. Generator loss (SoundStream): adversarial hinge + feature matching + multi-scale mel
reconstruction + commitment, weighted by `CodecLossWeights` (paper: 1, 100, 1; commitment 1), plus DAC's
multi-scale STFT loss and the waveform L1 distance where their weights are set.

`adversarial_start_step` > 0 trains the generator on its reconstruction losses alone until that step (the
discriminators train from step 0, so they are warmed up when the generator starts to follow them); the step is
counted in the 'codec_progress' collection, which is checkpointed with the rest, so a resumed run switches at
the same step.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from musiclm_jax.codec import losses as codec_losses
from musiclm_jax.models import RawAudioModel
from musiclm_jax.networks.discriminators import Discriminators, STFTDiscriminatorConfig, WaveDiscriminatorConfig
from musiclm_jax.networks.seanet import SEANetConfig
from musiclm_jax.networks.soundstream import SoundStream
from musiclm_jax.networks.quantizers import STATE, RVQConfig


@dataclasses.dataclass(frozen=True)
class CodecLossWeights:
    """Weights of the generator's loss terms (SoundStream: adversarial 1, feature matching 100, mel 1; the
    multi-scale STFT and waveform L1 terms are off unless set)."""

    adversarial: float = 1.0
    feature_matching: float = 100.0
    reconstruction: float = 1.0
    commitment: float = 1.0
    stft: float = 0.0
    waveform: float = 0.0


PROGRESS = "codec_progress"


class CodecModel(RawAudioModel):
    """What every trainable codec shares: `generator` (a Flax module with `hop_length`, `encode` and `decode`,
    what the Codec interface runs), its variables {'params': params['generator'], 'quantizer': ...}, and the train
    and evaluation losses from one `_losses(params, flax_mutables, audio, rng, train) -> (loss, metrics,
    updated collections)`. Subclasses: SoundStreamModel (below), spectral_codec_model.SpectralCodecModel."""

    generator: Any
    sample_rate: int

    @property
    def frame_rate(self) -> float:
        """Code frames (code vectors) per second."""
        return self.sample_rate / self.generator.hop_length

    def train_flops_per_example(self) -> float:
        raise NotImplementedError("the codec's FLOPs are not stated analytically; use the compiled step")

    def variables(self, params, flax_mutables) -> dict:
        """The generator's Flax variables (what the Codec interface runs)."""
        return {"params": params["generator"], STATE: flax_mutables[STATE]}

    @abc.abstractmethod
    def _losses(self, params, flax_mutables, audio, rng, train: bool):
        """(loss, metrics, updated Flax collections) of audio [batch, samples]; train: update the quantizer."""

    def train_loss_fn(self, params, flax_mutables, batch, dropout_rng):
        loss, metrics, updated = self._losses(params, flax_mutables, batch["audio"], dropout_rng, train=True)
        return loss, (metrics, dict(flax_mutables, **updated))

    def loss_fn(self, params, batch, dropout_rng, flax_mutables=None):
        if flax_mutables is None:
            raise ValueError("the codec's loss needs its quantizer state (flax_mutables)")
        loss, metrics, _ = self._losses(params, flax_mutables, batch["audio"], dropout_rng, train=False)
        return loss, metrics


class SoundStreamModel(CodecModel):
    """Codec training and evaluation on batches {'audio': [batch, samples] float32 in [-1, 1]}.

    Args:
      seanet, rvq: the generator (SEANet encoder/decoder around a residual VQ).
      wave_discriminator, stft_discriminator: the discriminators (None: that one is left out).
      sample_rate: Hz; segment_samples: samples per training example.
      loss_weights: see CodecLossWeights.
      mel_scales: window lengths (samples) of the multi-scale mel reconstruction loss.
      mel_bands: mel bands, one number for every scale or one per scale (fewer for short windows, see
        spectral.mel_filterbank). 64 is SoundStream's; at 24 kHz its filters near 300 Hz are 51 Hz apart (about
        three semitones), 128 bands' 26 Hz. DAC uses 5, 10, 20, 40, 80, 160, 320 for windows 32 .. 2048.
      mel_form: 'soundstream' or 'log_l1' (DAC), see codec_losses.MultiScaleMelLoss.
      stft_scales: windows of the multi-scale STFT loss (weight `loss_weights.stft`).
      adversarial_start_step: see the module docstring (0: adversarial from the start).
    """

    def __init__(self, seanet: SEANetConfig, rvq: RVQConfig, sample_rate: int, segment_samples: int,
                 wave_discriminator: Optional[WaveDiscriminatorConfig] = WaveDiscriminatorConfig(),
                 stft_discriminator: Optional[STFTDiscriminatorConfig] = STFTDiscriminatorConfig(),
                 loss_weights: CodecLossWeights = CodecLossWeights(),
                 mel_scales: Sequence[int] = (64, 128, 256, 512, 1024, 2048), mel_bands: int | Sequence[int] = 64,
                 mel_form: str = "soundstream", stft_scales: Sequence[int] = (2048, 512),
                 adversarial_start_step: int = 0):
        self.seanet, self.rvq = seanet, rvq
        self.sample_rate = int(sample_rate)
        self.segment_samples = int(segment_samples)
        self.loss_weights = loss_weights
        self.generator = SoundStream(seanet, rvq)
        self.discriminators = Discriminators(wave=wave_discriminator, stft=stft_discriminator)
        self.mel_loss = codec_losses.MultiScaleMelLoss(sample_rate=self.sample_rate, scales=tuple(mel_scales),
                                                       n_mels=mel_bands, form=mel_form)
        self.stft_loss = codec_losses.MultiScaleSTFTLoss(scales=tuple(stft_scales))
        self.adversarial_start_step = int(adversarial_start_step)
        if self.adversarial_start_step < 0:
            raise ValueError(f"SoundStreamModel.adversarial_start_step {adversarial_start_step} must be >= 0")
        longest = max(max(self.mel_loss.scales), max(self.stft_loss.scales) if loss_weights.stft else 0)
        if self.segment_samples < longest:
            raise ValueError(f"SoundStreamModel: segment_samples {segment_samples} is shorter than the longest loss "
                             f"window ({longest} samples)")

    def get_initial_variables(self, rng, input_shapes):
        # Parameter shapes do not depend on the length: initialise on a short clip (compiles faster).
        length = min(input_shapes["audio"][1], max(4 * self.seanet.hop_length, 4096))
        audio = jnp.zeros((input_shapes["audio"][0], length), jnp.float32)
        g_rng, d_rng = jax.random.split(rng)
        generator = self.generator.init({"params": g_rng}, audio)
        discriminator = self.discriminators.init({"params": d_rng}, audio)
        variables = {"params": {"generator": generator["params"], "discriminator": discriminator.get("params", {})},
                     STATE: generator[STATE]}
        if self.adversarial_start_step:
            variables[PROGRESS] = {"step": jnp.zeros((), jnp.int32)}
        return variables

    # ------------------------------------------------------------------------------------------ training
    def _losses(self, params, flax_mutables, audio, rng, train: bool):
        g_vars = {"params": params["generator"], STATE: flax_mutables[STATE]}
        if train:
            (recon, _, aux), updated = self.generator.apply(g_vars, audio, train=True, rng=rng, mutable=[STATE])
        else:
            (recon, _, aux), updated = self.generator.apply(g_vars, audio), {STATE: flax_mutables[STATE]}
        w = self.loss_weights
        zero = jnp.zeros((), jnp.float32)
        if self.has_discriminators:
            discriminator_loss, adversarial, feature_matching = self._adversarial_losses(
                params["discriminator"], audio, recon)
        else:  # reconstruction-only training: no discriminator is run
            discriminator_loss = adversarial = feature_matching = zero
        adversarial_on = jnp.float32(1.0)
        if train and self.adversarial_start_step:
            step = flax_mutables[PROGRESS]["step"]
            adversarial_on = (step >= self.adversarial_start_step).astype(jnp.float32)
            updated = dict(updated, **{PROGRESS: {"step": step + 1}})
        reconstruction = self.mel_loss(audio, recon)
        stft = self.stft_loss(audio, recon) if w.stft else zero
        waveform = codec_losses.waveform_l1(audio, recon) if w.waveform else zero
        commitment = aux["commitment_loss"]
        generator_loss = (adversarial_on * (w.adversarial * adversarial + w.feature_matching * feature_matching)
                          + w.reconstruction * reconstruction + w.commitment * commitment + w.stft * stft
                          + w.waveform * waveform)
        perplexity = {f"codebook_perplexity_{level}": aux["perplexity"][level]
                      for level in range(self.rvq.num_quantizers)}
        metrics = {
            "loss": generator_loss + discriminator_loss,
            "generator_loss": generator_loss,
            "discriminator_loss": discriminator_loss,
            "adversarial_loss": adversarial,
            "feature_matching_loss": feature_matching,
            "reconstruction_loss": reconstruction,
            "stft_loss": stft,
            "waveform_loss": waveform,
            "adversarial_weight": adversarial_on,
            **perplexity,
            "mel_distance": self.mel_loss.mel_distance(audio, recon),
            "commitment_loss": commitment,
            "mean_levels": jnp.mean(aux["num_levels"].astype(jnp.float32)),
            "loss_weight": jnp.float32(audio.shape[0]),
        }
        return generator_loss + discriminator_loss, metrics, updated

    @property
    def has_discriminators(self) -> bool:
        """False when both discriminators are None: the codec then trains on reconstruction alone."""
        return self.discriminators.wave is not None or self.discriminators.stft is not None

    def _adversarial_losses(self, d_params, audio, recon):
        """(discriminator hinge loss, generator hinge loss, feature-matching loss), float32 scalars."""
        batch = audio.shape[0]
        # Pass 1 (discriminator's gradient): real and generated audio in one batch, the generator frozen.
        both = self.discriminators.apply({"params": d_params},
                                         jnp.concatenate([audio, jax.lax.stop_gradient(recon)], axis=0))
        real = jax.tree.map(lambda x: x[:batch], both)
        fake_for_d = jax.tree.map(lambda x: x[batch:], both)
        # Pass 2 (generator's gradient): generated audio through the frozen discriminator.
        fake_for_g = self.discriminators.apply({"params": jax.lax.stop_gradient(d_params)}, recon)
        real_for_g = jax.lax.stop_gradient(real)
        return (codec_losses.hinge_discriminator_loss(real, fake_for_d), codec_losses.hinge_generator_loss(fake_for_g),
                codec_losses.feature_matching_loss(real_for_g, fake_for_g))

    # ------------------------------------------------------------------------------------------ inference
    def predict_batch_with_aux(self, params, batch, rng=None, *, flax_mutables=None, num_levels=None):
        """Reconstruction [batch, samples] of batch['audio'] through `num_levels` quantizer levels; aux: codes."""
        recon, codes, _ = self.generator.apply(self.variables(params, flax_mutables), batch["audio"],
                                               num_levels=num_levels)
        return recon, {"codes": codes[..., :num_levels or self.rvq.num_quantizers]}

    def score_batch(self, params, batch, flax_mutables=None):
        """[batch] negative mel distance between each example and its reconstruction."""
        recon, _ = self.predict_batch_with_aux(params, batch, flax_mutables=flax_mutables)
        return -jax.vmap(lambda a, b: self.mel_loss.mel_distance(a[None], b[None]))(batch["audio"], recon)
