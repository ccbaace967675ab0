"""Codec design options and measures: Snake activations, DAC's losses (log-L1 mel, multi-scale STFT, waveform L1),
codebook perplexity, the adversarial start step, and the pitch measures (dominant frequency, melody-token and
chroma_cqt agreement, Krumhansl-Schmuckler key) with the codec sanity check."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from flax import traverse_util

from helpers import harmonic_notes
from musiclm_jax.codec import losses as codec_losses
from musiclm_jax.generation import melody
from musiclm_jax.codec.model import PROGRESS, CodecLossWeights, SoundStreamModel
from musiclm_jax.evaluation import codec_eval, pitch_metrics
from musiclm_jax.networks.discriminators import STFTDiscriminatorConfig, WaveDiscriminatorConfig
from musiclm_jax.networks.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder, Snake
from musiclm_jax.networks.quantizers import RVQConfig, code_perplexity

RATE = 24000


def _tone(freq, seconds=1.0, amplitude=0.3, rate=RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------------- Snake


def test_snake_is_x_plus_sin_squared_over_alpha_with_one_alpha_per_channel():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 3).astype(np.float32))
    variables = Snake().init(jax.random.key(0), x)
    np.testing.assert_array_equal(nn.meta.unbox(variables)["params"]["alpha"], np.ones(3, np.float32))
    alpha = jnp.asarray([0.5, 2.0, -3.0])
    y = Snake().apply({"params": {"alpha": alpha}}, x)
    a = np.abs(np.asarray(alpha)) + 1e-4
    np.testing.assert_allclose(y, np.asarray(x) + np.sin(a * np.asarray(x)) ** 2 / a, rtol=1e-5, atol=1e-6)


def test_snake_seanet_has_alphas_and_elu_seanet_keeps_its_parameter_tree():
    audio = jnp.zeros((1, 480, 1))
    trees = {}
    for activation in ("elu", "snake"):
        cfg = SEANetConfig(channels=4, dimension=8, strides=(2, 3), residual_dilations=(1,), activation=activation)
        enc = SEANetEncoder(cfg).init(jax.random.key(0), audio)["params"]
        dec = SEANetDecoder(cfg).init(jax.random.key(1), jnp.zeros((1, 80, 8)))["params"]
        trees[activation] = {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.meta.unbox(
            {"enc": enc, "dec": dec})).items()}
    alphas = [k for k in trees["snake"] if k.endswith("alpha")]
    assert not any(k.endswith("alpha") for k in trees["elu"])
    # encoder: 2 per residual unit + 1 per block + the output one; decoder the same.
    assert len(alphas) == 2 * (2 * 2 + 2 + 1)
    assert set(trees["snake"]) - set(alphas) == set(trees["elu"])
    with pytest.raises(ValueError, match="activation 'relu'"):
        SEANetConfig(activation="relu")


# -------------------------------------------------------------------------------------------------- losses


def _pair(seed=0, samples=4096):
    rng = np.random.RandomState(seed)
    t = np.arange(samples) / RATE
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.randn(samples)).astype(np.float32)[None]
    y = (0.2 * np.sin(2 * np.pi * 470 * t) + 0.05 * rng.randn(samples)).astype(np.float32)[None]
    return x, y


def _magnitudes(audio, n_fft):
    """|STFT| [frames, bins] by librosa (periodic Hann, hop n_fft // 4, no centring)."""
    return np.abs(librosa.stft(audio[0].astype(np.float64), n_fft=n_fft, hop_length=n_fft // 4, window="hann",
                               center=False)).T


def test_multiscale_stft_loss_matches_a_librosa_computation():
    x, y = _pair()
    loss = codec_losses.MultiScaleSTFTLoss(scales=(2048, 512), magnitude_weight=0.7)
    expected = 0.0
    for scale in (2048, 512):
        mx, my = _magnitudes(x, scale), _magnitudes(y, scale)
        expected += np.mean(np.abs(np.log10(mx ** 2 + 1e-5) - np.log10(my ** 2 + 1e-5)))
        expected += 0.7 * np.mean(np.abs(mx - my))
    assert float(loss(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(expected, rel=1e-4)
    assert float(loss(jnp.asarray(x), jnp.asarray(x))) == 0.0
    with pytest.raises(ValueError, match="fewer than the window 2048"):
        loss(jnp.zeros((1, 1000)), jnp.zeros((1, 1000)))


def test_log_l1_mel_loss_matches_librosa_with_per_scale_bands():
    x, y = _pair(1)
    scales, bands = (256, 1024), (20, 80)
    loss = codec_losses.MultiScaleMelLoss(RATE, scales=scales, n_mels=bands, form="log_l1")
    expected = 0.0
    for scale, n in zip(scales, bands):
        bank = librosa.filters.mel(sr=RATE, n_fft=scale, n_mels=n, fmin=0.0, fmax=RATE / 2)
        mx, my = _magnitudes(x, scale) @ bank.T, _magnitudes(y, scale) @ bank.T
        expected += np.mean(np.abs(np.log10(mx + 1e-5) - np.log10(my + 1e-5)))
    assert float(loss(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="2 n_mels values for 3 scales"):
        codec_losses.MultiScaleMelLoss(RATE, scales=(64, 128, 256), n_mels=(5, 10))
    with pytest.raises(ValueError, match="form 'dac'"):
        codec_losses.MultiScaleMelLoss(RATE, form="dac")


def test_log_losses_still_pull_a_silent_estimate_toward_the_target():
    """The logarithms add eps instead of clamping at it, so an estimate that has fallen silent still gets a
    gradient (a clamp gives exactly zero there and such a decoder never recovers)."""
    x, _ = _pair(2)
    silent = jnp.zeros_like(jnp.asarray(x))
    for loss in (codec_losses.MultiScaleSTFTLoss(magnitude_weight=0.0),
                 codec_losses.MultiScaleMelLoss(RATE, scales=(512, 2048), form="log_l1")):
        grad = np.asarray(jax.grad(lambda e: loss(jnp.asarray(x), e))(silent + 1e-4 * jnp.asarray(x)))
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-3, type(loss).__name__


def test_waveform_l1_is_the_mean_absolute_difference():
    x, y = _pair(3)
    assert float(codec_losses.waveform_l1(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(
        np.mean(np.abs(x - y)), rel=1e-6)


# --------------------------------------------------------------------------------------- perplexity, GAN start


def test_code_perplexity_counts_used_codes_on_weighted_rows():
    assert float(code_perplexity(jnp.arange(8) % 4, jnp.ones(8), 16)) == pytest.approx(4.0, rel=1e-6)
    assert float(code_perplexity(jnp.zeros(8, jnp.int32), jnp.ones(8), 16)) == pytest.approx(1.0)
    # Rows of weight 0 do not count: codes 0 and 1 equally -> 2.
    idx = jnp.asarray([0, 1, 2, 3])
    assert float(code_perplexity(idx, jnp.asarray([1.0, 1.0, 0.0, 0.0]), 16)) == pytest.approx(2.0, rel=1e-6)


def _tiny_model(**kwargs):
    seanet = SEANetConfig(channels=4, dimension=8, strides=(2, 4, 6, 10), residual_dilations=(1,))
    rvq = RVQConfig(num_quantizers=3, codebook_size=16, dim=8, kmeans_iters=2)
    defaults = dict(wave_discriminator=WaveDiscriminatorConfig.tiny(num_scales=1),
                    stft_discriminator=STFTDiscriminatorConfig.tiny(), mel_scales=(128, 256))
    return SoundStreamModel(seanet, rvq, RATE, 4800, **{**defaults, **kwargs})


def test_adversarial_terms_start_at_the_adversarial_start_step_and_the_counter_is_state():
    model = _tiny_model(adversarial_start_step=2,
                        loss_weights=CodecLossWeights(stft=1.0, waveform=2.0))
    variables = model.get_initial_variables(jax.random.key(0), {"audio": (2, 4800)})
    params = variables["params"]
    mutables = {k: v for k, v in variables.items() if k != "params"}
    assert int(mutables[PROGRESS]["step"]) == 0
    audio = jnp.asarray(np.random.RandomState(0).uniform(-0.5, 0.5, (2, 4800)).astype(np.float32))
    step_fn = jax.jit(model.train_loss_fn)
    weights = []
    for step in range(3):
        _, (metrics, mutables) = step_fn(params, mutables, {"audio": audio}, jax.random.key(step))
        assert int(mutables[PROGRESS]["step"]) == step + 1
        weights.append(float(metrics["adversarial_weight"]))
        reconstruction_terms = (metrics["reconstruction_loss"] + metrics["commitment_loss"]
                                + metrics["stft_loss"] + 2.0 * metrics["waveform_loss"])
        adversarial_terms = metrics["adversarial_loss"] + 100.0 * metrics["feature_matching_loss"]
        assert float(metrics["generator_loss"]) == pytest.approx(
            float(reconstruction_terms + weights[-1] * adversarial_terms), rel=1e-5)
        assert float(metrics["discriminator_loss"]) > 0  # the discriminators train from step 0
        assert float(metrics["stft_loss"]) > 0 and float(metrics["waveform_loss"]) > 0
        for level in range(3):
            assert 1.0 <= float(metrics[f"codebook_perplexity_{level}"]) <= 16.0
    assert weights == [0.0, 0.0, 1.0]
    # Without the setting there is no counter (checkpoints of earlier runs and converted codecs still load).
    assert PROGRESS not in _tiny_model().get_initial_variables(jax.random.key(0), {"audio": (2, 4800)})
    with pytest.raises(ValueError, match="adversarial_start_step -1"):
        _tiny_model(adversarial_start_step=-1)
    with pytest.raises(ValueError, match="shorter than the longest loss window"):
        _tiny_model(loss_weights=CodecLossWeights(stft=1.0), stft_scales=(8192,))


# --------------------------------------------------------------------------------------------- pitch measures


@pytest.mark.parametrize("freq", [55.0, 61.7, 440.0, 1234.5, 4000.0])
def test_dominant_frequency_of_a_tone_is_within_a_cent(freq):
    assert abs(pitch_metrics.cents(pitch_metrics.dominant_frequency(_tone(freq, 1.5), RATE), freq)) < 1.0


def test_pitch_agreement_is_full_for_the_same_notes_and_low_for_other_notes():
    melody_notes = [60, 62, 64, 65, 67, 69, 71, 72]
    reference = harmonic_notes(melody_notes)[None]
    shifted = harmonic_notes([m + 3 for m in melody_notes])[None]  # a minor third up: every pitch class differs
    for measure in (pitch_metrics.melody_token_agreement, pitch_metrics.chroma_cqt_agreement):
        agree, total = measure(reference, reference, RATE)
        assert total >= 10 and agree == total, measure.__name__
        agree, total = measure(reference, shifted, RATE)
        assert agree <= 0.15 * total, (measure.__name__, agree, total)
    # Quiet frames and noise do not count as pitched.
    silence = np.zeros_like(reference)
    assert pitch_metrics.melody_token_agreement(silence, reference, RATE)[1] == 0
    assert pitch_metrics.chroma_cqt_agreement(silence, reference, RATE)[1] == 0
    assert melody.NO_MELODY == 12


@pytest.mark.parametrize("tonic,mode,midis", [
    (0, "major", [60, 64, 67, 72, 65, 69, 60, 67, 71, 74, 60, 64, 67]),   # C major: I, IV, I, V, I
    (9, "minor", [57, 60, 64, 69, 62, 65, 69, 57, 64, 68, 71, 57, 60, 64]),  # A minor: i, iv, i, V, i
])
def test_estimate_key_names_the_key_of_a_cadence(tonic, mode, midis):
    assert pitch_metrics.estimate_key(harmonic_notes(midis, 0.3), RATE) == (tonic, mode)
    assert pitch_metrics.key_name(tonic, mode) == {0: "C major", 9: "A minor"}[tonic]


def test_parse_key_reads_the_key_a_caption_names():
    assert pitch_metrics.parse_key("a medium-tempo synth lead melody in E major with drums") == (4, "major")
    assert pitch_metrics.parse_key("backing chords in Bb major") == (10, "major")
    assert pitch_metrics.parse_key("strings in F# minor, hall reverb") == (6, "minor")
    assert pitch_metrics.parse_key("a quiet chord accompaniment at 80 bpm") is None


class _FunctionCodec:
    """Just what codec_sanity uses: sample_rate and reconstruct."""

    sample_rate = RATE

    def __init__(self, fn):
        self.fn = fn

    def reconstruct(self, audio):
        return self.fn(np.asarray(audio))


def test_codec_sanity_passes_a_transparent_codec_and_fails_a_fixed_buzz():
    good = codec_eval.codec_sanity(_FunctionCodec(lambda a: a))
    assert max(abs(c) for c in good["cents"]) < 1.0
    assert good["silence_dbfs"] < -200 and good["dc_offset"] < 1e-6
    t = np.arange(2 * RATE) / RATE
    buzz = (0.06 * np.sign(np.sin(2 * np.pi * 300 * t)) - 0.06).astype(np.float32)
    bad = codec_eval.codec_sanity(_FunctionCodec(lambda a: np.broadcast_to(buzz, a.shape).copy()))
    assert all(abs(d - 300) < 2 for d in bad["dominant_hz"])
    assert bad["silence_dbfs"] > -30 and bad["dc_offset"] == pytest.approx(0.06, rel=0.01)
