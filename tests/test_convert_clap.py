"""CLAP import: a random-initialised small transformers ClapModel converted by `python -m musiclm_jax.convert clap`
gives the same unit-norm audio and text embeddings within 1e-4 (fp32), through MuLan.from_checkpoint with the
checkpoint's tokenizer.json (needs the `convert` extra)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers import CLAP_FEATURES, small_clap_model, write_word_tokenizer  # noqa: E402
from musiclm_jax.convert.__main__ import main as convert_main  # noqa: E402
from musiclm_jax.convert.clap import UnsupportedClapConfig, text_config_from_hf  # noqa: E402
from musiclm_jax.mulan.inference import MuLan  # noqa: E402

FEATURES = CLAP_FEATURES


def _clap():
    return small_clap_model()


def _tokenizer(path):
    return write_word_tokenizer(path)


def test_clap_import_matches_transformers(tmp_path):
    model = _clap()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(FEATURES))
    hf_tokenizer = _tokenizer(tmp_path / "hf" / "tokenizer.json")
    convert_main(["clap", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "mulan")])
    mulan = MuLan.from_checkpoint(str(tmp_path / "mulan"))
    assert mulan.sample_rate == 16000 and mulan.window_samples == 16000 and mulan.embed_dim == 24

    rng = np.random.RandomState(0)
    audio = (0.3 * rng.randn(2, 16000)).astype(np.float32)
    extractor = transformers.ClapFeatureExtractor(**{k: v for k, v in FEATURES.items()})
    features = extractor(list(audio), sampling_rate=16000, return_tensors="pt", truncation="rand_trunc",
                         padding="repeatpad")
    with torch.no_grad():
        want = model.get_audio_features(input_features=features["input_features"],
                                        is_longer=features["is_longer"]).pooler_output.numpy()
    got = mulan.embed_audio(audio)
    assert np.max(np.abs(got - want)) < 1e-4, f"audio embeddings differ by {np.max(np.abs(got - want)):.2e}"

    captions = ["calm piano", "loud fast drums with a guitar"]
    got = mulan.embed_text(captions)
    encoded = [hf_tokenizer.encode(c).ids for c in captions]
    length = max(map(len, encoded))
    ids = torch.tensor([e + [1] * (length - len(e)) for e in encoded])
    with torch.no_grad():
        want = model.get_text_features(input_ids=ids, attention_mask=(ids != 1).long()).pooler_output.numpy()
    assert np.max(np.abs(got - want)) < 1e-4, f"text embeddings differ by {np.max(np.abs(got - want)):.2e}"
    similarity = mulan.similarity(captions, audio)
    np.testing.assert_allclose(similarity, want @ mulan.embed_audio(audio).T, atol=1e-4)


def test_unsupported_clap_settings_are_named():
    config = transformers.ClapTextConfig(hidden_act="relu", projection_hidden_act="tanh")
    with pytest.raises(UnsupportedClapConfig, match="projection_hidden_act"):
        text_config_from_hf(config)


def test_clip_embeddings_follow_clap_conventions_for_short_and_long_clips(tmp_path):
    """Shorter than the window (1 s here, 10 s in the released CLAP): the clip is repeated as many whole times as
    fit, then zero-padded, as transformers' ClapFeatureExtractor(padding='repeatpad'). Longer: the normalised mean
    of the embeddings of 1 s-stride windows with a last one ending at the clip's end (the MuLan recipe; the
    extractor's truncation='rand_trunc' would embed one random window instead), each window as transformers."""
    model = _clap()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(FEATURES))
    _tokenizer(tmp_path / "hf" / "tokenizer.json")
    convert_main(["clap", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "mulan")])
    mulan = MuLan.from_checkpoint(str(tmp_path / "mulan"))
    assert mulan.model.short_clip_padding == "repeatpad"
    extractor = transformers.ClapFeatureExtractor(**FEATURES)

    def reference(clips):
        features = extractor(list(clips), sampling_rate=16000, return_tensors="pt", truncation="rand_trunc",
                             padding="repeatpad")
        with torch.no_grad():
            return model.get_audio_features(input_features=features["input_features"],
                                            is_longer=features["is_longer"]).pooler_output.numpy()

    rng = np.random.RandomState(1)
    for seconds in (0.1, 0.3, 0.5, 1.0):  # 10, 3 and 2 whole repeats (0.3 s: 3 repeats then 0.1 s of zeros), none
        audio = (0.3 * rng.randn(2, int(seconds * 16000))).astype(np.float32)
        got, want = mulan.embed_audio(audio), reference(audio)
        assert np.max(np.abs(got - want)) < 1e-4, (seconds, float(np.max(np.abs(got - want))))
    # Zero padding alone (this project's MuLan convention) gives a different embedding for a short clip.
    short = (0.3 * rng.randn(1, 4800)).astype(np.float32)
    padded = reference(np.pad(short, ((0, 0), (0, 16000 - 4800))))
    assert np.max(np.abs(mulan.embed_audio(short) - padded)) > 1e-2
    long = (0.3 * rng.randn(1, 40000)).astype(np.float32)  # 2.5 s: windows at 0, 1 and 1.5 s
    windows = reference(np.stack([long[0, s:s + 16000] for s in (0, 16000, 24000)]))
    want = windows.mean(axis=0) / np.linalg.norm(windows.mean(axis=0))
    assert np.max(np.abs(mulan.embed_audio(long)[0] - want)) < 1e-4
