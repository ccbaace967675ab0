"""The spectral codec: its STFT inverse and Griffin-Lim, shapes and checks, the loss weights, tone augmentation,
and (on a codec trained through the CLI once per module) the signal-level sanity checks and pitch keeping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_on_one_device
from helpers import adam_steps
from musiclm_jax.codec import __main__ as codec_cli
from musiclm_jax.codec import inference as codec_lib
from musiclm_jax import spectral
from musiclm_jax.data import audio_io, synthetic_music
from musiclm_jax.evaluation import codec_eval, pitch_metrics
from musiclm_jax.networks.spectral_codec import (SpectralCodec, SpectralCodecConfig, griffin_lim, istft,
                                                 log_magnitude)
from musiclm_jax.partitioning import unbox
from musiclm_jax.networks.quantizers import RVQConfig
from musiclm_jax.codec.spectral_model import SpectralCodecModel

RATE = 24000
CONFIG = SpectralCodecConfig(width=32, blocks=1)
RVQ = RVQConfig(num_quantizers=4, codebook_size=64, dim=32)


def _tone(freq, seconds=2.0, amplitude=0.3):
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_istft_inverts_the_centred_stft():
    audio = np.random.default_rng(0).normal(size=(2, 4800)).astype(np.float32) * 0.1
    spec = spectral.stft(jnp.asarray(audio), 960, 240, center=True)
    np.testing.assert_allclose(np.asarray(istft(spec, 960, 240, 4800)), audio, atol=2e-6)
    with pytest.raises(ValueError, match="multiple"):
        istft(spec, 1000, 240, 4800)


@pytest.mark.parametrize("freq", [55.0, 440.0, 3520.0])
def test_griffin_lim_restores_a_tone_from_its_magnitude(freq):
    audio = _tone(freq)[None]
    magnitude = jnp.abs(spectral.stft(jnp.asarray(audio), 1920, 240, center=True))
    out = np.asarray(griffin_lim(magnitude, 1920, 240, audio.shape[1], iters=64, momentum=0.99, init="random"))
    assert out.shape == audio.shape
    dominant = pitch_metrics.dominant_frequency(out[0, RATE // 2:], RATE)
    assert abs(pitch_metrics.cents(dominant, freq)) < 25  # observed: 20 cents at 55 Hz, 0.2 at 3520 Hz (49 at 55 Hz with a 960-sample window)
    # The level is kept to within 1 dB.
    assert abs(pitch_metrics.level_dbfs(out[0]) - pitch_metrics.level_dbfs(audio[0])) < 1.0


LOW_AND_HIGH_TONES_HZ = (41.0, 55.0, 62.0, 73.0, 82.0, 98.0, 110.0, 220.0, 1760.0, 4000.0, 6000.0)


def _griffin_lim_cents(init: str, iters: int, phases) -> np.ndarray:
    """|cents| error [phases, tones] of the tones' true magnitudes (the codec's STFT: 960 / 240) through
    Griffin-Lim, the tones starting at each phase."""
    cfg = SpectralCodecConfig()
    t = np.arange(2 * RATE) / RATE
    errors = []
    for phase in phases:
        audio = np.stack([0.3 * np.sin(2 * np.pi * f * t + phase) for f in LOW_AND_HIGH_TONES_HZ]).astype(np.float32)
        magnitude = jnp.abs(spectral.stft(jnp.asarray(audio), cfg.n_fft, cfg.stft_hop, center=True))
        out = np.asarray(griffin_lim(magnitude, cfg.n_fft, cfg.stft_hop, audio.shape[1], iters, 0.99, init=init))
        errors.append([abs(pitch_metrics.cents(pitch_metrics.dominant_frequency(y[RATE // 2:], RATE), f))
                       for y, f in zip(out, LOW_AND_HIGH_TONES_HZ)])
    return np.array(errors)


def test_peak_phases_let_griffin_lim_return_low_tones_at_their_pitch():
    """The codec's 960-sample window puts 55 Hz 2.2 bins from DC: from random phases, Griffin-Lim returns the
    true magnitudes of 41 Hz to 110 Hz up to 67 cents off (observed 29..67 over 6 starting phases), from
    `peak_phases` within 16 cents at 16 iterations (observed 16 at 41 Hz, 11 at 55 Hz, 8 at 82 Hz)."""
    phases = np.linspace(0, 2 * np.pi, 3, endpoint=False)
    peaks = _griffin_lim_cents("peaks", 16, phases)
    assert peaks.max() < 25, peaks.round(1)
    random = _griffin_lim_cents("random", 64, phases)
    assert random.max() > 2 * peaks.max(), (random.round(1), peaks.round(1))


def test_peak_phases_advance_each_partial_at_its_frequency():
    """Bins within 2 of a partial advance by 2 pi f hop / rate per frame (f its frequency, refined between bins),
    so they move together; bins with no peak within 2 advance at their own centre frequency."""
    from musiclm_jax.networks.spectral_codec import peak_phases
    cfg = SpectralCodecConfig()
    freq = 1010.0  # 40.4 bins of 25 Hz
    magnitude = jnp.abs(spectral.stft(jnp.asarray(_tone(freq, 0.5)[None]), cfg.n_fft, cfg.stft_hop, center=True))
    magnitude = magnitude.at[..., 150:].set(1e-3)  # a flat stretch: no peaks there
    phases = np.asarray(peak_phases(magnitude, cfg.n_fft, cfg.stft_hop))[0]
    assert phases.shape == magnitude.shape[1:] and np.all(phases[0] == 0)
    advance = phases[30] - phases[29]
    expected = 2 * np.pi * freq * cfg.stft_hop / RATE
    np.testing.assert_allclose(advance[38:43], expected, rtol=2e-3)  # the partial's bins, refined to 0.2%
    np.testing.assert_allclose(advance[200], 2 * np.pi * 200 * cfg.stft_hop / cfg.n_fft, rtol=1e-4)
    with pytest.raises(ValueError, match="init"):
        griffin_lim(magnitude, cfg.n_fft, cfg.stft_hop, 100, 1, 0.99, init="zeros")
    with pytest.raises(ValueError, match="griffin_lim_init"):
        SpectralCodecConfig(griffin_lim_init="zeros")


def test_shapes_of_codes_spectra_and_audio():
    network = SpectralCodec(CONFIG, RVQ)
    audio = jnp.asarray(np.random.default_rng(1).normal(size=(2, 1000)).astype(np.float32) * 0.1)
    variables = unbox(network.init({"params": jax.random.key(0)}, audio))
    decoded, codes, aux = network.apply(variables, audio)
    frames = 3  # ceil(1000 / 480)
    assert codes.shape == (2, frames, 4) and decoded.shape == (2, frames * 2, 481)
    assert log_magnitude(audio, CONFIG).shape == decoded.shape
    assert aux["perplexity"].shape == (4,)
    two_levels = network.apply(variables, audio, 2, method=SpectralCodec.encode)
    np.testing.assert_array_equal(two_levels, codes[..., :2])
    assert network.apply(variables, two_levels, method=SpectralCodec.decode).shape == (2, frames * 480)
    # At initialisation the residual branches contribute nothing: the encoder is its linear layer.
    enc = variables["params"]["encoder"]
    assert not np.any(enc["branch_out"]["kernel"]) and enc["linear"]["kernel"].shape == (2 * 481, 32)


def test_configuration_errors_name_the_setting():
    with pytest.raises(ValueError, match="n_fft 1000 must be a multiple of stft_hop 240"):
        SpectralCodecConfig(n_fft=1000)
    with pytest.raises(ValueError, match="dimension 16 != quantizer dim 32"):
        SpectralCodec(SpectralCodecConfig(dimension=16), RVQ).init({"params": jax.random.key(0)}, jnp.zeros((1, 960)))
    with pytest.raises(ValueError, match="tone_fraction"):
        SpectralCodecModel(CONFIG, RVQ, RATE, RATE, tone_fraction=1.5)
    with pytest.raises(ValueError, match="tone_linear_fraction -0.5 must be in"):
        SpectralCodecModel(CONFIG, RVQ, RATE, RATE, tone_fraction=0.5, tone_linear_fraction=-0.5)
    with pytest.raises(ValueError, match="weighting_min_hz"):
        SpectralCodecModel(CONFIG, RVQ, RATE, RATE, weighting_min_hz=0.0)
    with pytest.raises(ValueError, match="mel_weight"):
        SpectralCodecModel(CONFIG, RVQ, RATE, RATE, mel_weight=-1.0)
    with pytest.raises(ValueError, match="mel_bands 400: n_fft 960 at 24000 Hz has only"):
        SpectralCodecModel(CONFIG, RVQ, RATE, RATE, mel_weight=1.0, mel_bands=400)
    with pytest.raises(ValueError, match="pitch_latent_weight"):
        SpectralCodecModel(SpectralCodecConfig(dimension=8), RVQConfig(dim=8), RATE, RATE, pitch_latent_weight=1.0)


def test_bin_weights_give_octaves_equal_weight_above_the_floor_and_average_one():
    model = SpectralCodecModel(CONFIG, RVQ, RATE, RATE, weighting_min_hz=100.0)
    w, f = model.bin_weights, CONFIG.bin_frequencies(RATE)
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[f == 1000][0] / w[f == 2000][0] == pytest.approx(2.0, rel=1e-5)
    assert w[0] == w[4] == w.max()  # 0 and 100 Hz: below the floor, equal
    assert np.all(SpectralCodecModel(CONFIG, RVQ, RATE, RATE, weighting_min_hz=None).bin_weights == 1.0)


def test_tone_augmentation_replaces_the_drawn_rows_with_pure_tones():
    audio = jnp.zeros((64, RATE), jnp.float32)
    everything = SpectralCodecModel(CONFIG, RVQ, RATE, RATE, tone_fraction=1.0).with_tones(audio, jax.random.key(3))
    freqs = [pitch_metrics.dominant_frequency(row, RATE) for row in np.asarray(everything)]
    assert min(freqs) > 40 * 0.99 and max(freqs) < 8000 * 1.01
    assert np.median(freqs) == pytest.approx(np.sqrt(40 * 8000), rel=0.5)  # log-uniform: median near the geometric mean
    half = SpectralCodecModel(CONFIG, RVQ, RATE, RATE, tone_fraction=0.5).with_tones(audio, jax.random.key(3))
    replaced = int(np.sum(np.any(np.asarray(half) != 0, axis=1)))
    assert 20 <= replaced <= 44
    # tone_linear_fraction 0 (the default) draws exactly the tones drawn before the option existed.
    unset = SpectralCodecModel(CONFIG, RVQ, RATE, RATE, tone_fraction=1.0, tone_linear_fraction=0.0)
    np.testing.assert_array_equal(unset.with_tones(audio, jax.random.key(3)), everything)


def test_linear_tones_cover_the_high_bins_as_often_as_the_low_ones():
    """Uniform in Hz, the tones above 4 kHz are (8000 - 4000) / (8000 - 40) of them (50%); log-uniform, only
    log(2) / log(200) (13%). Half and half: 32%."""
    audio = jnp.zeros((512, 4800), jnp.float32)
    def high_share(linear):
        model = SpectralCodecModel(CONFIG, RVQ, RATE, 4800, tone_fraction=1.0, tone_linear_fraction=linear)
        rows = np.asarray(model.with_tones(audio, jax.random.key(5)))
        spectrum = np.abs(np.fft.rfft(rows, axis=1))
        return float(np.mean(np.fft.rfftfreq(4800, 1 / RATE)[np.argmax(spectrum, axis=1)] > 4000))
    assert high_share(0.0) == pytest.approx(np.log(2) / np.log(200), abs=0.05)
    assert high_share(1.0) == pytest.approx(4000 / 7960, abs=0.06)
    assert high_share(0.5) == pytest.approx(0.5 * (np.log(2) / np.log(200) + 4000 / 7960), abs=0.06)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    model = SpectralCodecModel(CONFIG, RVQ, RATE, 12000)
    audio = jnp.asarray(np.stack([synthetic_music.generate_clip(i, seed=0, seconds=0.5)["audio"] for i in range(4)]))
    variables = unbox(model.get_initial_variables(jax.random.key(0), {"audio": (4, 12000)}))
    params, state, history = adam_steps(model, variables["params"], {"quantizer": variables["quantizer"]},
                                        {"audio": audio}, steps=60, learning_rate=1e-3)
    losses = [float(metrics["reconstruction_loss"]) for metrics in history]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])  # observed ~0.2x
    _, eval_metrics = model.loss_fn(params, {"audio": audio}, None, state)
    assert set(eval_metrics) >= {"reconstruction_loss", "log_magnitude_l1", "commitment_loss",
                                 "codebook_perplexity_0", "codebook_perplexity_3"}


def test_log_mel_term_is_the_squared_error_of_the_decoded_and_true_mel_power():
    """mel_weight adds mel_weight * mean((log(M |X^|^2 + eps^2) - log(M |X|^2 + eps^2))^2), |X^| the magnitudes
    Griffin-Lim receives (exp(x^) - eps, clipped at 0), M librosa's Slaney mel filterbank; checked in numpy."""
    import librosa
    model = SpectralCodecModel(CONFIG, RVQ, RATE, 12000, mel_weight=0.5, mel_bands=48)
    plain = SpectralCodecModel(CONFIG, RVQ, RATE, 12000)
    audio = jnp.asarray(np.stack([synthetic_music.generate_clip(i, seed=1, seconds=0.5)["audio"] for i in range(2)]))
    variables = unbox(model.get_initial_variables(jax.random.key(0), {"audio": (2, 12000)}))
    state = {"quantizer": variables["quantizer"]}
    loss, metrics = model.loss_fn(variables["params"], {"audio": audio}, None, state)
    decoded, _, aux = model.generator.apply({"params": variables["params"]["generator"], **state}, audio)
    eps = CONFIG.log_eps
    bank = librosa.filters.mel(sr=RATE, n_fft=CONFIG.n_fft, n_mels=48, fmin=0.0, fmax=RATE / 2).astype(np.float64)

    def log_mel(log_mag):
        magnitude = np.maximum(np.exp(np.asarray(log_mag, np.float64)) - eps, 0.0)
        return np.log(np.square(magnitude) @ bank.T + eps * eps)

    want = np.mean(np.square(log_mel(decoded) - log_mel(aux["log_magnitude"])))
    assert float(metrics["log_mel_error"]) == pytest.approx(want, rel=1e-4)
    base = float(plain.loss_fn(variables["params"], {"audio": audio}, None, state)[0])
    assert float(loss) == pytest.approx(base + 0.5 * want, rel=1e-4)


def test_pitch_latent_target_is_the_pitch_class_profile_and_training_reaches_it():
    """pitch_latent_weight: the loss adds weight * mean((z[..., :12] - scale * pitch_class_profile)^2) over the code
    frames; a few steps on a fixed batch pull the latents' first 12 dimensions to the scaled profile."""
    model = SpectralCodecModel(CONFIG, RVQ, RATE, 12000, pitch_latent_weight=2.0, pitch_latent_scale=3.0)
    audio = jnp.asarray(np.stack([synthetic_music.generate_clip(i, seed=0, seconds=0.5)["audio"] for i in range(4)]))
    variables = unbox(model.get_initial_variables(jax.random.key(0), {"audio": (4, 12000)}))
    state = {"quantizer": variables["quantizer"]}
    loss, metrics = model.loss_fn(variables["params"], {"audio": audio}, None, state)
    (_, _, aux) = model.generator.apply({"params": variables["params"]["generator"], **state}, audio)
    profile = spectral.pitch_class_profile(audio, RATE, aux["latents"].shape[1], CONFIG.hop_length)
    want = float(jnp.mean(jnp.square(aux["latents"][..., :12] - 3.0 * profile)))
    assert float(metrics["pitch_latent_loss"]) == pytest.approx(want, rel=1e-5)
    plain = SpectralCodecModel(CONFIG, RVQ, RATE, 12000)
    assert float(loss) == pytest.approx(float(plain.loss_fn(variables["params"], {"audio": audio}, None, state)[0])
                                        + 2.0 * want, rel=1e-5)
    _, _, history = adam_steps(model, variables["params"], state, {"audio": audio}, steps=40, learning_rate=3e-3)
    pitch = [float(m["pitch_latent_loss"]) for m in history]
    assert np.mean(pitch[-5:]) < 0.3 * np.mean(pitch[:5])


# The demo's codec: gin/codec/spectral_tiny.gin trained through the CLI for its own 1,000 steps (about 4 min).
FIXTURE_STEPS = 1000


@pytest.fixture(scope="module")
def trained_spectral_codec(tmp_path_factory):
    return train_on_one_device("gin/codec/spectral_tiny.gin", str(tmp_path_factory.mktemp("spectral_codec")),
                               f"--gin.TRAIN_STEPS={FIXTURE_STEPS}", "--gin.train_lib.train.checkpoint_period=1000",
                               timeout=600)


def test_trained_codec_passes_the_tone_silence_and_dc_checks(trained_spectral_codec):
    """Issue 16 item 2 on the demo's codec (4 x 512, no quantizer dropout, half the examples pure tones, half of
    those uniform in Hz, the log-mel term, residual width 512; 1,000 steps): each pure tone of 55, 110, 220, 440,
    880, 1760, 3520 and 4000 Hz comes back within 50 cents (observed on an AVX-512 CPU, the CI's machine type:
    -37, -13, +6, +29, -8, -9, +25, +1; training seeds 1 and 2: within 46, and 110 Hz 59 cents off), silence at or
    below -50 dBFS and a DC offset of at most 1e-3. At width 256 the same machine returned 55 Hz 90 cents flat
    (seeds 1 and 2: 55 Hz 60 cents, 220 Hz 51), where the machine it was tuned on returned it 18 cents flat
    (gin/codec/spectral_tiny.gin). The SoundStream codec this replaced returned every tone up to 880 Hz at the
    same 300 Hz (up to 1,900 cents off)."""
    sanity = codec_eval.codec_sanity(codec_lib.Codec.from_checkpoint(trained_spectral_codec))
    assert sanity["silence_dbfs"] <= -50 and sanity["dc_offset"] <= 1e-3, sanity
    assert len(sanity["cents"]) == 8 and max(abs(c) for c in sanity["cents"]) <= 50, sanity


def test_trained_codec_keeps_the_pitch_class(trained_spectral_codec):
    metrics = codec_eval.evaluate_codec(trained_spectral_codec, max_examples=8, clip_seconds=4.0)
    # Observed at 1,000 steps on these 8 clips: 72.2% / 65.7% on an AVX-512 CPU (75.8% / 73.2% on 16; at width 256
    # on the machine it was tuned on 69.6% / 71.0%; the SoundStream demo codec kept 7% / 12%; chance 8%).
    assert metrics["pitch_class_agreement"] >= 0.6 and metrics["chroma_cqt_agreement"] >= 0.6, metrics
    assert metrics["bitrate_kbps"] == pytest.approx(1.8) and len(metrics["codebook_perplexity"]) == 4


def test_codec_cli_round_trip_of_the_spectral_codec(trained_spectral_codec, tmp_path):
    codec = codec_lib.Codec.from_checkpoint(trained_spectral_codec)
    assert (codec.sample_rate, codec.hop_length, codec.num_quantizers, codec.codebook_size) == (24000, 480, 4, 512)
    audio = synthetic_music.generate_clip(3, seed=5, seconds=1.0)["audio"]
    wav = str(tmp_path / "in.wav")
    audio_io.save_audio(wav, audio, RATE)
    codec_cli.main(["encode", "--checkpoint", trained_spectral_codec, "--input", wav, "--output",
                    str(tmp_path / "codes.npy")])
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (50, 4)
    codec_cli.main(["decode", "--checkpoint", trained_spectral_codec, "--input", str(tmp_path / "codes.npy"),
                    "--output", str(tmp_path / "out.wav")])
    decoded = audio_io.load_audio(str(tmp_path / "out.wav"), RATE)
    np.testing.assert_allclose(decoded, np.clip(codec.decode(codes), -1, 1), atol=1.0 / 2**15 + 1e-6)
