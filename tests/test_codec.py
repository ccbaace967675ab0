"""The SoundStream codec: paper-config rates and shapes, causality, GAN training, the Codec interface and CLI."""
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_on_one_device
from musiclm_jax.codec import __main__ as codec_cli
from musiclm_jax.codec import inference as codec_lib
from musiclm_jax import gin_utils
from musiclm_jax import train  # noqa: F401  (the run files bind train_lib.train)
from musiclm_jax.data import audio_io
from musiclm_jax.networks.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder
from musiclm_jax.partitioning import unbox

TRAIN_STEPS = 200
# Mean mel distance of the last 10 of 200 steps against the first 10 (observed ratio ~0.55).
MEL_RATIO_BELOW = 0.75
RECONSTRUCTION_STEPS = 120  # observed mel-distance ratio (last 10 / first 10) 0.56


def _paper_codec():
    gin_utils.parse_gin(["gin/codec/paper.gin"], ["MODEL_DIR = '/tmp/unused'"])
    model = gin_utils.bound_arguments("train", ["model"], {})["model"]
    gin.clear_config()
    audio = jnp.zeros((1, model.sample_rate))
    variables = unbox(model.generator.init({"params": jax.random.key(0)}, audio))
    return codec_lib.Codec(model.generator, variables, model.sample_rate)


def test_paper_config_is_24khz_50hz_12_levels_6kbps():
    codec = _paper_codec()
    assert (codec.sample_rate, codec.frame_rate, codec.hop_length) == (24000, 50.0, 480)
    assert (codec.num_quantizers, codec.codebook_size) == (12, 1024)
    assert codec.bitrate_kbps() == pytest.approx(6.0)
    assert codec.num_quantizers_for_bandwidth(3.0) == 6
    audio = np.random.RandomState(0).randn(2, 24000 + 100).astype(np.float32) * 0.1
    codes = codec.encode(audio)
    assert codes.shape == (2, 51, 12) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 1024
    assert codec.decode(codes).shape == (2, 51 * 480)
    assert codec.decode(codes[..., :3]).shape == (2, 51 * 480)  # fewer levels: a lower bitrate
    with pytest.raises(ValueError, match="num_quantizers=13"):
        codec.encode(audio, 13)


def test_encoder_and_decoder_are_causal():
    cfg = SEANetConfig(channels=4, dimension=8, strides=(2, 3), residual_dilations=(1, 3), lstm_layers=1,
                       weight_norm=True, conv_shortcut=True, pad_mode="reflect")
    rng = np.random.RandomState(0)
    audio = rng.randn(1, 120, 1).astype(np.float32)
    changed = audio.copy()
    t0 = 61
    changed[:, t0:] = rng.randn(1, 120 - t0, 1)
    encoder, decoder = SEANetEncoder(cfg), SEANetDecoder(cfg)
    enc_vars = encoder.init(jax.random.key(0), audio)
    a, b = encoder.apply(enc_vars, audio), encoder.apply(enc_vars, changed)
    hop = cfg.hop_length
    frames_before = t0 // hop  # frames whose samples all precede t0
    np.testing.assert_array_equal(a[:, :frames_before], b[:, :frames_before])
    assert not np.allclose(a[:, frames_before:], b[:, frames_before:])
    dec_vars = decoder.init(jax.random.key(1), a)
    latents_changed = np.asarray(a).copy()
    latents_changed[:, 10:] += 1.0
    x, y = decoder.apply(dec_vars, a), decoder.apply(dec_vars, latents_changed)
    np.testing.assert_array_equal(x[:, :10 * hop], y[:, :10 * hop])
    assert not np.allclose(x[:, 10 * hop:], y[:, 10 * hop:])


@pytest.fixture(scope="module")
def trained_tiny_codec(tmp_path_factory):
    """200 steps of the tiny codec through the training CLI, on one CPU device (batch 4 x 0.25 s)."""
    return train_on_one_device("gin/codec/tiny.gin", str(tmp_path_factory.mktemp("codec_tiny")),
                               f"--gin.TRAIN_STEPS={TRAIN_STEPS}", "--gin.BATCH_SIZE=4", "--gin.SEGMENT_SAMPLES=6000",
                               "--gin.train_lib.train.checkpoint_period=200")


def test_gan_training_lowers_the_mel_distance(trained_tiny_codec):
    with open(os.path.join(trained_tiny_codec, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))
    for r in records:
        assert all(np.isfinite(v) for v in r.values()), r
    first = np.mean([r["mel_distance"] for r in records[:10]])
    last = np.mean([r["mel_distance"] for r in records[-10:]])
    assert last < MEL_RATIO_BELOW * first, (first, last)
    # Both players learn: the discriminator separates real from generated audio better than at the start.
    assert np.mean([r["discriminator_loss"] for r in records[-20:]]) < np.mean(
        [r["discriminator_loss"] for r in records[:5]])
    assert 1.0 <= records[-1]["mean_levels"] <= 4.0  # quantizer dropout draws 1..4 levels


def test_reconstruction_only_codec_trains_without_discriminators(tmp_path):
    """gin/codec/tiny_reconstruction.gin (the demo's codec): no discriminator is built or run, the adversarial
    terms are exactly 0, and the mel distance falls as fast as in GAN training."""
    model_dir = train_on_one_device("gin/codec/tiny_reconstruction.gin", str(tmp_path / "codec"),
                                    f"--gin.TRAIN_STEPS={RECONSTRUCTION_STEPS}", "--gin.BATCH_SIZE=4",
                                    "--gin.SEGMENT_SAMPLES=6000",
                                    f"--gin.train_lib.train.checkpoint_period={RECONSTRUCTION_STEPS}")
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == RECONSTRUCTION_STEPS
    for r in records:
        assert r["discriminator_loss"] == r["adversarial_loss"] == r["feature_matching_loss"] == 0.0, r
        # Codebook usage per level goes to metrics.jsonl.
        assert all(1.0 <= r[f"codebook_perplexity_{level}"] <= 64.0 for level in range(4)), r
    first = np.mean([r["mel_distance"] for r in records[:10]])
    last = np.mean([r["mel_distance"] for r in records[-10:]])
    assert last < MEL_RATIO_BELOW * first, (first, last)
    codec = codec_lib.Codec.from_checkpoint(model_dir)  # the generator alone, as for a GAN-trained codec
    assert codec.encode(np.zeros((1, 4800), np.float32)).shape == (1, 10, 4)


def test_adversarial_start_step_survives_a_resume(tmp_path):
    """The GAN codec with adversarial_start_step = 3 through the training CLI: the generator's adversarial terms
    are off for steps 1-3 and on from step 4, also when the run stops after step 2 and resumes from its checkpoint
    (the step counter is checkpointed state)."""
    common = ["--gin.BATCH_SIZE=2", "--gin.SEGMENT_SAMPLES=6000", "--gin.train_lib.train.checkpoint_period=2",
              "--gin.codec_model.SoundStreamModel.adversarial_start_step=3"]
    model_dir = str(tmp_path / "codec")
    train_on_one_device("gin/codec/tiny.gin", model_dir, "--gin.TRAIN_STEPS=2", *common)
    train_on_one_device("gin/codec/tiny.gin", model_dir, "--gin.TRAIN_STEPS=5", *common)
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["adversarial_weight"]) for r in records] == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 1.0),
                                                                       (5, 1.0)]
    assert all(r["discriminator_loss"] > 0 for r in records)  # the discriminators train from the first step


def test_codec_cli_round_trip(trained_tiny_codec, tmp_path):
    codec = codec_lib.Codec.from_checkpoint(trained_tiny_codec)
    assert (codec.sample_rate, codec.num_quantizers, codec.codebook_size) == (24000, 4, 512)
    from musiclm_jax.data import synthetic_music
    audio = synthetic_music.generate_clip(7, seed=5, seconds=1.0, sample_rate=16000)["audio"]
    wav = str(tmp_path / "in.wav")
    audio_io.save_audio(wav, audio, 16000)  # another rate: the CLI resamples
    codec_cli.main(["encode", "--checkpoint", trained_tiny_codec, "--input", wav, "--output",
                    str(tmp_path / "codes.npy"), "--num_quantizers", "2"])
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (50, 2)  # 1 s at 50 Hz, 2 levels
    np.testing.assert_array_equal(codes, codec.encode(audio_io.load_audio(wav, 24000), 2))
    codec_cli.main(["decode", "--checkpoint", trained_tiny_codec, "--input", str(tmp_path / "codes.npy"),
                    "--output", str(tmp_path / "out.wav")])
    decoded = audio_io.load_audio(str(tmp_path / "out.wav"), 24000)
    assert decoded.shape == (24000,)
    np.testing.assert_allclose(decoded, np.clip(codec.decode(codes), -1, 1), atol=1.0 / 2**15 + 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        codec.decode(np.full((5, 2), 512))


def test_bad_input_is_downmixed_resampled_padded_or_named(trained_tiny_codec, tmp_path):
    import soundfile
    codec = codec_lib.Codec.from_checkpoint(trained_tiny_codec)
    rng = np.random.RandomState(0)
    odd = 0.3 * rng.randn(2, 24000 + 123).astype(np.float32)  # not a multiple of the 480-sample hop
    assert codec.reconstruct(odd).shape == odd.shape
    assert codec.encode(odd).shape == (2, 51, 4)
    # A stereo file at 44.1 kHz through the CLI: downmixed, resampled, and trimmed back with --num_samples.
    stereo = str(tmp_path / "stereo.wav")
    soundfile.write(stereo, 0.3 * rng.randn(44100 // 2, 2).astype(np.float32), 44100)
    codec_cli.main(["encode", "--checkpoint", trained_tiny_codec, "--input", stereo, "--output",
                    str(tmp_path / "codes.npy")])
    assert np.load(tmp_path / "codes.npy").shape == (25, 4)
    codec_cli.main(["decode", "--checkpoint", trained_tiny_codec, "--input", str(tmp_path / "codes.npy"),
                    "--output", str(tmp_path / "back.wav"), "--num_samples", "12000"])
    assert soundfile.info(str(tmp_path / "back.wav")).frames == 12000
    # Non-finite samples and undecodable files are errors naming the file.
    nan_wav = str(tmp_path / "nan.wav")
    soundfile.write(nan_wav, np.full(4800, np.nan, np.float32), 24000, subtype="FLOAT")
    with pytest.raises(audio_io.AudioDecodeError, match="nan.wav: non-finite samples"):
        codec_cli.main(["encode", "--checkpoint", trained_tiny_codec, "--input", nan_wav, "--output",
                        str(tmp_path / "x.npy")])
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(audio_io.AudioDecodeError, match="junk.wav: cannot decode audio"):
        codec_cli.main(["encode", "--checkpoint", trained_tiny_codec, "--input", str(junk), "--output",
                        str(tmp_path / "x.npy")])


def test_codec_eval_writes_metrics_that_match_a_direct_computation(trained_tiny_codec, tmp_path):
    import soundfile
    from musiclm_jax import eval as eval_lib
    from musiclm_jax.codec.losses import MultiScaleMelLoss
    from musiclm_jax.data import synthetic_music
    from musiclm_jax.evaluation import pitch_metrics
    from musiclm_jax.evaluation.audio_metrics import si_snr_db
    clips = tmp_path / "clips"
    clips.mkdir()
    a = synthetic_music.generate_clip(1, seed=9, seconds=0.6, sample_rate=44100)["audio"]
    soundfile.write(str(clips / "a.wav"), np.stack([a, 0.5 * a], axis=1), 44100)  # stereo, 44.1 kHz
    b = synthetic_music.generate_clip(2, seed=9, seconds=0.4, sample_rate=16000)["audio"]
    soundfile.write(str(clips / "b.flac"), b, 16000)  # shorter than the clip window
    soundfile.write(str(clips / "train.wav"), b, 16000)
    soundfile.write(str(clips / "nan.wav"), np.full(4800, np.nan, np.float32), 24000, subtype="FLOAT")
    with open(clips / "captions.jsonl", "w") as f:
        for name, split in [("a.wav", "test"), ("b.flac", "test"), ("nan.wav", "test"), ("train.wav", "train")]:
            f.write(json.dumps({"audio_path": name, "caption": "x", "split": split}) + "\n")
    out = tmp_path / "eval"
    eval_lib.main(["--gin_file=gin/eval/codec.gin", f"--gin.CHECKPOINT_DIR='{trained_tiny_codec}'",
                   f"--gin.AUDIO_DIR='{clips}'", f"--gin.OUTPUT_DIR='{out}'",
                   "--gin.codec_eval.evaluate_codec.clip_seconds=0.5"])
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["num_examples"] == 2 and metrics["num_skipped"] == 0  # nan.wav is dropped (counted) by the scan
    assert metrics["bitrate_kbps"] == pytest.approx(4 * 9 * 50 / 1000)  # 4 levels x log2(512) bits x 50 Hz
    codec = codec_lib.Codec.from_checkpoint(trained_tiny_codec)
    mel = MultiScaleMelLoss(24000)
    snrs, mels = [], []
    pitch = {"melody": np.zeros(2, int), "chroma_cqt": np.zeros(2, int)}
    histogram = np.zeros(codec.codebook_size, int)
    for name in ("a.wav", "b.flac"):
        audio = audio_io.load_audio(str(clips / name), 24000, max_seconds=0.5)
        recon = codec.reconstruct(audio)
        snrs.append(si_snr_db(audio, recon))
        mels.append(float(mel.mel_distance(audio[None], recon[None])))
        pitch["melody"] += pitch_metrics.melody_token_agreement(audio[None], recon[None], 24000)
        pitch["chroma_cqt"] += pitch_metrics.chroma_cqt_agreement(audio[None], recon[None], 24000)
        histogram += np.bincount(codec.encode(audio)[:, 0], minlength=codec.codebook_size)
    assert metrics["si_snr_db"] == pytest.approx(np.mean(snrs), abs=1e-3)
    assert metrics["mel_distance"] == pytest.approx(np.mean(mels), rel=1e-4)
    # Pitch: pooled over the frames of both clips, by both measures (evaluation/pitch_metrics.py).
    for key, name in (("pitch_class_agreement", "melody"), ("chroma_cqt_agreement", "chroma_cqt")):
        agree, total = pitch[name]
        assert metrics[{"melody": "pitched_frames", "chroma_cqt": "chroma_cqt_frames"}[name]] == total > 0
        assert metrics[key] == pytest.approx(agree / total, abs=1.01 / total)
    p = histogram / histogram.sum()
    assert metrics["codebook_perplexity"][0] == pytest.approx(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))), rel=1e-3)
    assert len(metrics["codebook_perplexity"]) == 4
    assert metrics["sanity"]["silence_dbfs"] < 0 and len(metrics["sanity"]["cents"]) == 8  # codec_sanity
    # Fewer levels: the bitrate follows; the embedded synthetic test clips are the default data.
    result = eval_lib.main(["--gin_file=gin/eval/codec.gin", f"--gin.CHECKPOINT_DIR='{trained_tiny_codec}'",
                            "--gin.NUM_QUANTIZERS=1", "--gin.codec_eval.evaluate_codec.max_examples=3",
                            "--gin.codec_eval.evaluate_codec.clip_seconds=0.5"])
    assert result["bitrate_kbps"] == pytest.approx(9 * 50 / 1000) and result["num_examples"] == 3
    assert os.path.exists(os.path.join(trained_tiny_codec, "eval", "codec", "metrics.json"))
    assert np.isfinite(result["si_snr_db"]) and result["mel_distance"] > 0


def test_conv_padding_gives_ceil_length_over_stride_frames_in_integer_arithmetic():
    """layers.conv_padding (integer arithmetic, so a symbolic length exports) equals the float formula
    frames = ceil((length - effective + total) / stride), over lengths 1..199 and the SEANet kernels, and the
    padded length always gives ceil(length / stride) outputs."""
    import math

    from musiclm_jax import layers
    for length in range(1, 200):
        for kernel, stride, dilation in ((1, 1, 1), (3, 1, 3), (7, 1, 9), (4, 2, 1), (8, 4, 1), (12, 6, 1),
                                         (20, 10, 1)):
            effective = (kernel - 1) * dilation + 1
            total = effective - stride
            frames = math.ceil((length - effective + total) / stride)
            for causal in (True, False):
                left, right = layers.conv_padding(length, kernel, stride, dilation, causal)
                assert left + right == total + frames * stride + effective - total - length
                assert (length + left + right - effective) // stride + 1 == math.ceil(length / stride)
