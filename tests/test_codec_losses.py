"""Codec losses and discriminators: STFT against librosa, hinge / feature-matching values by hand, mel-loss
behaviour, discriminator shapes, logical axis names and gradients."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from musiclm_jax import partitioning
from musiclm_jax.codec.losses import (MultiScaleMelLoss, feature_matching_loss, hinge_discriminator_loss,
                                      hinge_generator_loss)
from musiclm_jax.spectral import mel_filterbank
from musiclm_jax.networks.discriminators import (Discriminators, MultiScaleWaveDiscriminator,
                                                 STFTDiscriminatorConfig, WaveDiscriminatorConfig)
from musiclm_jax.spectral import stft

SAMPLE_RATE = 24000


def _audio(batch: int, samples: int, seed: int = 0) -> np.ndarray:
    """Sines plus noise, peak around 0.5."""
    rng = np.random.RandomState(seed)
    t = np.arange(samples) / SAMPLE_RATE
    freqs = rng.uniform(100, 4000, size=(batch, 3, 1))
    tones = np.sin(2 * np.pi * freqs * t).sum(axis=1) / 6
    return (tones + 0.05 * rng.randn(batch, samples)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ STFT


@pytest.mark.parametrize("n_fft,hop,center", [(1024, 256, False), (64, 16, False), (96, 40, False),
                                              (256, 64, True)])
def test_stft_matches_librosa(n_fft, hop, center):
    audio = np.random.RandomState(1).uniform(-0.5, 0.5, size=(2, 5000)).astype(np.float32)
    ours = np.asarray(stft(jnp.asarray(audio), n_fft, hop, center=center))
    assert ours.dtype == np.complex64
    ref = np.stack([librosa.stft(a.astype(np.float64), n_fft=n_fft, hop_length=hop, window="hann", center=center,
                                 pad_mode="constant").T for a in audio])
    assert ours.shape == ref.shape == (2, 1 + (5000 + (n_fft if center else 0) - n_fft) // hop, n_fft // 2 + 1)
    assert np.max(np.abs(ours - ref)) < 1e-4


# ------------------------------------------------------------------------------------ adversarial and features


def _outputs(logits, features):
    return [(jnp.asarray(l, jnp.float32), [jnp.asarray(f, jnp.float32) for f in fs])
            for l, fs in zip(logits, features)]


def test_hinge_losses_by_hand():
    real = _outputs([[[0.5], [-2.0], [1.5]], [[3.0, 0.0]]], [[[1.0]], [[1.0]]])
    fake = _outputs([[[-0.5], [0.25], [-3.0]], [[1.0, -1.0]]], [[[1.0]], [[1.0]]])
    # D1: real relu(1 - [0.5, -2, 1.5]) = [0.5, 3, 0] -> 7/6; fake relu(1 + [-0.5, 0.25, -3]) = [0.5, 1.25, 0] -> 7/12.
    # D2: real relu(1 - [3, 0]) = [0, 1] -> 1/2; fake relu(1 + [1, -1]) = [2, 0] -> 1.
    expected_d = ((7 / 6 + 7 / 12) + (1 / 2 + 1)) / 2
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(expected_d, abs=1e-6)
    # Generator: relu(1 - [-0.5, 0.25, -3]) = [1.5, 0.75, 4] -> 6.25/3; relu(1 - [1, -1]) = [0, 2] -> 1.
    expected_g = (6.25 / 3 + 1.0) / 2
    assert float(hinge_generator_loss(fake)) == pytest.approx(expected_g, abs=1e-6)


def test_feature_matching_by_hand():
    # Discriminator 1 has two layers, discriminator 2 one: the mean is over layers, then over discriminators.
    real = _outputs([[0.0], [0.0]], [[[[1.0, 2.0]], [[0.0, 0.0, 0.0]]], [[[[1.0], [2.0]]]]])
    fake = _outputs([[0.0], [0.0]], [[[[1.5, 0.0]], [[1.0, -2.0, 0.0]]], [[[[0.0], [6.0]]]]])
    d1 = np.mean([np.mean([0.5, 2.0]), np.mean([1.0, 2.0, 0.0])])  # (1.25 + 1) / 2
    d2 = np.mean([1.0, 4.0])
    assert float(feature_matching_loss(real, fake)) == pytest.approx((d1 + d2) / 2, abs=1e-6)
    assert float(feature_matching_loss(real, real)) == 0.0


# ------------------------------------------------------------------------------------------------- mel loss


@pytest.fixture(scope="module")
def mel_loss():
    return MultiScaleMelLoss(SAMPLE_RATE)


def test_mel_filterbanks_have_no_empty_filters(mel_loss):
    for scale, bank in zip(mel_loss.scales, mel_loss.filterbanks):
        assert bank.shape[0] == scale // 2 + 1 and 1 <= bank.shape[1] <= 64
        assert np.all(bank.max(axis=0) > 0)
    assert mel_filterbank(SAMPLE_RATE, 2048, 64).shape == (64, 1025)


def test_mel_loss_values_and_gradient(mel_loss):
    target = jnp.asarray(_audio(2, 4800))
    noise = jnp.asarray(np.random.RandomState(3).randn(2, 4800).astype(np.float32))
    loss = jax.jit(mel_loss.__call__)
    assert float(loss(target, target)) == 0.0
    assert float(mel_loss.mel_distance(target, target)) == 0.0
    values = [float(loss(target, target + level * noise)) for level in (0.003, 0.03, 0.3)]
    assert values[0] > 0 and values[0] < values[1] < values[2], values
    distances = [float(mel_loss.mel_distance(target, target + level * noise)) for level in (0.003, 0.03, 0.3)]
    assert 0 < distances[0] < distances[1] < distances[2], distances
    grad = jax.jit(jax.grad(lambda e: mel_loss(target, e)))(target + 0.03 * noise)
    assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) > 0
    grad_same = jax.jit(jax.grad(lambda e: mel_loss(target, e)))(target)
    assert np.all(np.isfinite(grad_same))
    with pytest.raises(ValueError, match="fewer than the window"):
        mel_loss(target[:, :1000], target[:, :1000])


# --------------------------------------------------------------------------------------------- discriminators


@pytest.fixture(scope="module")
def discriminators():
    model = Discriminators(WaveDiscriminatorConfig.tiny(), STFTDiscriminatorConfig.tiny())
    audio = jnp.asarray(_audio(2, 4800, seed=5))
    variables = jax.jit(model.init)(jax.random.key(0), audio)
    return model, variables, audio


def test_discriminator_outputs(discriminators):
    model, variables, audio = discriminators
    outputs = jax.jit(model.apply)(partitioning.unbox(variables), audio)
    assert len(outputs) == model.wave.num_scales + 1
    for k, (logits, features) in enumerate(outputs):
        assert logits.ndim == 3 and logits.shape[0] == 2 and logits.shape[-1] == 1
        assert np.all(np.isfinite(logits)) and all(np.all(np.isfinite(f)) for f in features)
        if k < model.wave.num_scales:
            assert logits.shape[1] == math.ceil(4800 / (2 ** k * 256)) == model.wave.num_logits(4800, k)
            assert len(features) == len(model.wave.channels) + 1
            assert [f.shape[-1] for f in features] == list(model.wave.channels) + [model.wave.channels[-1]]
        else:
            assert logits.shape[1] == math.ceil((1 + (4800 - 256) // 64) / 8) == model.stft.num_logits(4800)
            assert len(features) == len(model.stft.channel_multipliers)
            assert all(f.ndim == 4 for f in features)


def test_either_discriminator_can_be_left_out():
    audio = jnp.zeros((2, 4800), jnp.float32)
    for wave_cfg, stft_cfg, expected in [(None, STFTDiscriminatorConfig.tiny(), 1),
                                 (WaveDiscriminatorConfig.tiny(), None, WaveDiscriminatorConfig.tiny().num_scales),
                                 (None, None, 0)]:
        model = Discriminators(wave=wave_cfg, stft=stft_cfg)
        variables = model.init(jax.random.key(0), audio)
        outputs = model.apply(partitioning.unbox(variables), audio)
        assert len(outputs) == expected
        assert ("wave" in variables.get("params", {})) == (wave_cfg is not None)
        assert ("stft" in variables.get("params", {})) == (stft_cfg is not None)


@pytest.mark.parametrize("samples", [3001, 4097])
def test_wave_logit_length(samples):
    cfg = WaveDiscriminatorConfig.tiny()
    model = MultiScaleWaveDiscriminator(cfg)
    audio = jax.ShapeDtypeStruct((1, samples), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), audio)
    outputs = jax.eval_shape(model.apply, variables, audio)
    assert [o[0].shape for o in outputs] == [(1, math.ceil(samples / (2 ** k * 256)), 1) for k in range(3)]


def test_discriminator_parameters_have_logical_names(discriminators):
    _, variables, _ = discriminators
    known = {name for name, _ in partitioning.standard_logical_axis_rules()}
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    for box in boxes:
        assert len(box.names) == box.value.ndim and set(box.names) <= known, box.names
    specs = jax.tree.leaves(nn.get_partition_spec(variables),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(boxes)
    for spec in specs:
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0 and set(spec) <= known


def test_generator_gradient_through_discriminators(discriminators):
    model, variables, audio = discriminators
    params = partitioning.unbox(variables)
    grad = jax.jit(jax.grad(lambda a: hinge_generator_loss(model.apply(params, a))))(audio)
    assert grad.shape == audio.shape
    assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) > 0


def test_config_validation():
    with pytest.raises(ValueError, match="groups"):
        WaveDiscriminatorConfig(channels=(4, 6, 8), strides=(4, 4), groups=(4, 4))
    with pytest.raises(ValueError, match="strides"):
        WaveDiscriminatorConfig(channels=(4, 8), strides=(4, 4))
    assert WaveDiscriminatorConfig().layer_groups == (4, 16, 64, 256)
    assert WaveDiscriminatorConfig().layer_kernel_sizes == (41, 41, 41, 41)
