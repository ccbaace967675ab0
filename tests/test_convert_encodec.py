"""EnCodec import: a random-initialised transformers EncodecModel and the converted codec give identical codes
and decoded audio within 1e-4 at every bandwidth (needs the `convert` extra: torch + transformers)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import EncodecConfig, EncodecModel  # noqa: E402

from musiclm_jax.codec.inference import Codec  # noqa: E402
from musiclm_jax.convert.__main__ import main as convert_main  # noqa: E402
from musiclm_jax.convert.encodec import UnsupportedEncodecConfig, convert_encodec  # noqa: E402
from musiclm_jax.networks.soundstream import SoundStream  # noqa: E402


@pytest.fixture(scope="module")
def encodec():
    torch.manual_seed(0)
    model = EncodecModel(EncodecConfig()).eval()  # the 24 kHz model's architecture, random weights
    with torch.no_grad():
        for layer in model.quantizer.layers:  # random codebooks (the default buffers are zeros)
            layer.codebook.embed.normal_()
    return model


def _reference(model, audio, bandwidth):
    with torch.no_grad():
        encoded = model.encode(torch.tensor(audio)[:, None], bandwidth=bandwidth)
        decoded = model.decode(encoded.audio_codes, encoded.audio_scales)[0][:, 0].numpy()
    return encoded.audio_codes[0].numpy().transpose(0, 2, 1), decoded


def test_converted_codec_matches_transformers_at_every_bandwidth(encodec):
    params, state, seanet, rvq, sample_rate = convert_encodec(encodec)
    codec = Codec(SoundStream(seanet, rvq), {"params": params, **state}, sample_rate)
    assert (codec.sample_rate, codec.frame_rate, codec.num_quantizers) == (24000, 75.0, 32)
    audio = np.random.RandomState(0).randn(2, 24000 + 123).astype(np.float32) * 0.1
    for bandwidth in encodec.config.target_bandwidths:  # 1.5, 3, 6, 12, 24 kbps -> 2, 4, 8, 16, 32 levels
        n = codec.num_quantizers_for_bandwidth(bandwidth)
        assert n == encodec.quantizer.get_num_quantizers_for_bandwidth(bandwidth)
        ref_codes, ref_audio = _reference(encodec, audio, bandwidth)
        codes = codec.encode(audio, n)
        np.testing.assert_array_equal(codes, ref_codes)
        decoded = codec.decode(codes)
        assert decoded.shape == ref_audio.shape
        assert np.std(ref_audio) > 1e-3  # a non-trivial signal to compare
        np.testing.assert_allclose(decoded, ref_audio, atol=1e-4, rtol=0)


def test_convert_cli_writes_a_loadable_run_directory(encodec, tmp_path):
    encodec.save_pretrained(tmp_path / "hf")
    convert_main(["encodec", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "run")])
    assert (tmp_path / "run" / "config.gin").exists()
    codec = Codec.from_checkpoint(str(tmp_path / "run"))
    audio = np.random.RandomState(1).randn(1, 9600).astype(np.float32) * 0.1
    ref_codes, ref_audio = _reference(encodec, audio, 6.0)
    codes = codec.encode(audio, 8)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_allclose(codec.decode(codes), ref_audio, atol=1e-4, rtol=0)


def test_bandwidth_keeps_the_levels_encodec_uses_at_that_bitrate(encodec, tmp_path):
    """--bandwidth 6: the run directory's codec has EnCodec's 8 levels of 6 kbps (75 Hz x 10 bits x 8 = 6 kbit/s)
    and codes and decodes as EnCodec does at 6 kbps."""
    encodec.save_pretrained(tmp_path / "hf")
    convert_main(["encodec", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "run"), "--bandwidth", "6"])
    codec = Codec.from_checkpoint(str(tmp_path / "run"))
    assert (codec.num_quantizers, codec.bitrate_kbps()) == (8, 6.0)
    audio = np.random.RandomState(2).randn(1, 9600).astype(np.float32) * 0.1
    ref_codes, ref_audio = _reference(encodec, audio, 6.0)
    codes = codec.encode(audio)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_allclose(codec.decode(codes), ref_audio, atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match="--bandwidth applies to encodec only"):
        convert_main(["hubert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "x"), "--bandwidth", "6"])


def test_unsupported_encodec_settings_are_named():
    with pytest.raises(UnsupportedEncodecConfig, match="normalize"):
        convert_encodec(EncodecModel(EncodecConfig(normalize=True)))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        convert_main(["encodec", "--from", "/nonexistent/encodec", "--to", "/tmp/unused"])
