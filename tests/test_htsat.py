"""CLAP audio tower import: random-initialised small transformers ClapAudioModels and the converted
networks.htsat.HTSAT give the same pooled output within 1e-4 in fp32; HTSATConfig.features gives
ClapFeatureExtractor's log-mel features (needs the `convert` extra: torch + transformers).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from musiclm_jax import partitioning  # noqa: E402
from musiclm_jax.convert.clap_audio import UnsupportedClapAudioConfig, config_from_hf, convert_clap_audio  # noqa: E402
from musiclm_jax.networks.htsat import HTSAT, HTSATConfig  # noqa: E402

# 128 x 128 image (two 64-bin chunks of 128 frames), 32 x 32 patches of 16 channels.
SMALL = dict(patch_embeds_hidden_size=16, hidden_size=64, spec_size=128, num_mel_bins=64, patch_size=4,
             patch_stride=(4, 4))
VARIANTS = {
    # windows of 8: stage 0 (32 x 32) shifted by 4 with the region penalty; stage 2 (8 x 8) is one window, so its
    # second layer is not shifted.
    "shifted_one_window": dict(window_size=8, depths=(2, 1, 2), num_attention_heads=(2, 2, 4)),
    # windows of 6: every stage (32, 16 patches) is zero-padded to a multiple of 6, shifted by 3 in odd layers.
    "padded": dict(window_size=6, depths=(2, 2), num_attention_heads=(2, 4), qkv_bias=False, mlp_ratio=2.0),
}


def _hf_model(variant: str):
    torch.manual_seed(0)
    model = transformers.ClapAudioModel(transformers.ClapAudioConfig(**SMALL, **VARIANTS[variant])).eval()
    with torch.no_grad():  # move every parameter off its init (zero biases and tables, unit norms) so all matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
            else:  # unit-variance outputs instead of std-0.02 weights: attention far from uniform, large branches
                p.normal_(0.0, p[0].numel() ** -0.5)
        bn = model.audio_encoder.batch_norm  # random running statistics: tests the folding into scale and shift
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 5.0 - 40.0)
        bn.running_var.copy_(torch.rand_like(bn.running_var) * 50.0 + 10.0)
    return model


# Features of 1 s at 16 kHz: 101 frames, fewer than the model's 256 (stretched by bicubic interpolation).
FEATURES = dict(sample_rate=16000, fft_window_size=512, hop_length=160, max_length_s=1, frequency_min=50,
                frequency_max=8000)


def _extractor():
    return transformers.ClapFeatureExtractor(
        feature_size=64, sampling_rate=16000, hop_length=160, fft_window_size=512, max_length_s=1, frequency_min=50,
        frequency_max=8000)


def _pooled(hf, features):
    with torch.no_grad():
        out = hf(input_features=torch.tensor(features)[:, None], is_longer=torch.zeros(len(features), 1,
                                                                                          dtype=torch.bool))
    return out.pooler_output.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pooled_output_matches_transformers(variant):
    hf = _hf_model(variant)
    params, config = convert_clap_audio(hf, **FEATURES)
    assert config.output_dim == 16 * 2 ** (len(config.depths) - 1) and config.spec_width == 256
    apply = jax.jit(HTSAT(config).apply)
    rng = np.random.RandomState(0)
    diffs = {}
    features = (rng.randn(2, 256, 64) * 6.0 - 40.0).astype(np.float32)  # dB-like values around bn0's mean
    want = _pooled(hf, features)
    got = np.asarray(apply({"params": params}, features))
    assert got.shape == want.shape == (2, config.output_dim) and np.std(want) > 0.1
    diffs["features"] = float(np.max(np.abs(got - want)))
    # End to end: audio -> ClapFeatureExtractor -> ClapAudioModel against audio -> features -> HTSAT; its 101 frames
    # are fewer than spec_width, so the time axis is stretched by bicubic interpolation.
    audio = (rng.randn(2, 7000) * 0.1).astype(np.float32)
    reference = _extractor()(list(audio), sampling_rate=16000, return_tensors="np", truncation="rand_trunc",
                             padding="repeatpad").input_features[:, 0]
    want = _pooled(hf, reference)
    got = np.asarray(apply({"params": params}, config.features(audio)))
    diffs["audio"] = float(np.max(np.abs(got - want)))
    print(f"{variant}: max abs diff of the pooled output {diffs}")
    assert max(diffs.values()) < 1e-4, f"{variant}: pooled outputs differ by up to {diffs}"


def test_parameters_have_known_logical_names():
    config = config_from_hf(transformers.ClapAudioConfig(**SMALL, **VARIANTS["shifted_one_window"]), **FEATURES)
    abstract = jax.eval_shape(lambda: HTSAT(config).init(jax.random.key(0), np.zeros((1, 256, 64), np.float32)))
    partitioning.Partitioner(partitioning.mesh_from_shape({"data": -1})).logical_specs(abstract)  # names known


def test_features_match_clap_feature_extractor():
    config = HTSATConfig(**FEATURES)
    assert config.num_samples == 16000 and config.num_frames == 101
    extractor = _extractor()
    rng = np.random.RandomState(0)
    # 0.3 s (tiled 3 times, then 0.1 s of zeros: -100 dB frames), 0.55 s (once, then zeros), exactly 1 s (as is).
    clips = [rng.randn(n).astype(np.float32) * 0.1 for n in (4800, 8800, 16000)]
    diffs = []
    for clip in clips:
        want = extractor([clip], sampling_rate=16000, return_tensors="np", truncation="rand_trunc",
                         padding="repeatpad").input_features[:, 0]
        got = np.asarray(jax.jit(config.features)(clip[None]))
        assert got.shape == want.shape == (1, 101, 64)
        diffs.append(float(np.max(np.abs(got - want))))
    # Two clips of one length in one batch: each example is padded on its own.
    pair = np.stack([clips[0], rng.randn(4800).astype(np.float32)])
    want = extractor(list(pair), sampling_rate=16000, return_tensors="np", truncation="rand_trunc",
                     padding="repeatpad").input_features[:, 0]
    diffs.append(float(np.max(np.abs(np.asarray(config.features(pair)) - want))))
    print(f"log-mel max abs diff per call (dB): {diffs}")
    # dB = 10 log10(power): the fp32 STFT's relative error (~1e-6 for broadband noise) is ~1e-5 dB; 1e-3 dB leaves
    # room for the low-energy frames next to the zero padding.
    assert max(diffs) < 1e-3, f"log-mel features differ by up to {max(diffs):.3e} dB"
    with pytest.raises(ValueError, match="crop"):
        config.features(np.zeros((1, 16001), np.float32))


def test_unsupported_settings_are_named():
    with pytest.raises(ValueError, match="fused CLAP checkpoints are not supported"):
        HTSATConfig(enable_fusion=True)
    with pytest.raises(UnsupportedClapAudioConfig, match="enable_fusion"):
        config_from_hf(transformers.ClapAudioConfig(enable_fusion=True))
    with pytest.raises(UnsupportedClapAudioConfig, match="flatten_patch_embeds"):
        config_from_hf(transformers.ClapAudioConfig(flatten_patch_embeds=False))
    with pytest.raises(ValueError, match="window_size=16"):
        HTSATConfig(window_size=16)  # the last stage has 8 x 8 patches
    with pytest.raises(ValueError, match="num_mel_bins=80"):
        HTSATConfig(num_mel_bins=80)
    default = HTSATConfig()
    assert (default.output_dim, default.num_samples, default.num_frames, default.spec_width) == (768, 480000, 1001,
                                                                                                 1024)
