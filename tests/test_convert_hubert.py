"""HuBERT/MERT import: random-initialised small transformers HubertModels (post-norm with group norm, pre-norm
with layer norms) and the converted networks.hubert.Hubert give every hidden state within 1e-4 in fp32; the CLI
writes a run directory whose HubertFeatureModel embeds the same (needs the `convert` extra: torch + transformers).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from musiclm_jax import checkpoint_loading, partitioning  # noqa: E402
from musiclm_jax.convert.__main__ import main as convert_main  # noqa: E402
from musiclm_jax.convert.hubert import UnsupportedHubertConfig, config_from_hf, convert_hubert  # noqa: E402
from musiclm_jax.semantic.hubert_model import HubertFeatureModel  # noqa: E402
from musiclm_jax.networks.hubert import Hubert, HubertConfig, num_frames  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16, 16),
             conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4, conv_bias=True)
VARIANTS = {"post_norm_group": dict(feat_extract_norm="group", do_stable_layer_norm=False),
            "pre_norm_layer": dict(feat_extract_norm="layer", do_stable_layer_norm=True)}


def _hf_model(variant: str):
    torch.manual_seed(0)
    model = transformers.HubertModel(transformers.HubertConfig(**SMALL, **VARIANTS[variant])).eval()
    with torch.no_grad():  # move every parameter off its init (zero biases, unit norms, g = |v|) so all matter
        for name, p in model.named_parameters():
            if "original0" in name:  # the positional convolution's per-tap gains
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_model(request):
    return _hf_model(request.param)


def _reference(model, audio):
    """transformers' hidden states; for pre-norm models the last one with the final layer norm (last_hidden_state:
    transformers 5.x leaves it out of hidden_states, 4.x put it in)."""
    with torch.no_grad():
        out = model(torch.tensor(audio), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    hidden[-1] = out.last_hidden_state.numpy()
    return hidden


def test_every_hidden_state_matches_transformers(hf_model):
    params, config = convert_hubert(hf_model)
    assert config.do_stable_layer_norm == hf_model.config.do_stable_layer_norm
    network = Hubert(config)
    abstract = partitioning.unbox(jax.eval_shape(lambda: network.init(jax.random.key(0), jnp.zeros((1, 1000)))))
    assert jax.tree.map(np.shape, abstract["params"]) == jax.tree.map(np.shape, params)
    audio = np.random.RandomState(0).randn(2, 3203).astype(np.float32)
    reference = _reference(hf_model, audio)
    hidden = network.apply({"params": params}, audio)
    assert len(hidden) == len(reference) == config.num_hidden_layers + 1
    diffs = []
    for got, want in zip(hidden, reference):
        assert got.shape == want.shape == (2, config.num_frames(3203), 32)
        assert np.std(want) > 0.1  # a non-trivial signal to compare
        diffs.append(float(np.max(np.abs(np.asarray(got) - want))))
    print(f"{'pre' if config.do_stable_layer_norm else 'post'}-norm max abs diff per hidden state: {diffs}")
    assert max(diffs) < 1e-4


def test_convert_cli_writes_a_loadable_run_directory(tmp_path):
    hf = _hf_model("pre_norm_layer")
    hf.save_pretrained(tmp_path / "hf")
    convert_main(["hubert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "run")])
    assert (tmp_path / "run" / "config.gin").exists()
    loaded = checkpoint_loading.load_model(str(tmp_path / "run"))
    model = loaded.model
    assert isinstance(model, HubertFeatureModel)
    assert (model.sample_rate, model.frame_rate, model.num_layers) == (16000, 800.0, 2)
    assert model.network == config_from_hf(hf.config)
    audio = np.random.RandomState(1).randn(1, 2000).astype(np.float32)
    reference = _reference(hf, audio)
    diffs = []
    for layer in range(model.num_layers + 1):
        diffs.append(float(np.max(np.abs(np.asarray(model.embed(loaded.params, audio, layer)) - reference[layer]))))
    print(f"CLI round trip max abs diff per layer: {diffs}")
    assert max(diffs) < 1e-4
    prediction, _ = model.predict_batch_with_aux(loaded.params, {"audio": audio})
    np.testing.assert_allclose(prediction, reference[-1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        model.embed(loaded.params, audio, 3)
    with pytest.raises(NotImplementedError, match="train w2v-BERT instead"):
        model.loss_fn(loaded.params, {"audio": audio}, None)
    with pytest.raises(NotImplementedError, match="feature extractor"):
        model.score_batch(loaded.params, {"audio": audio})


def test_hubert_base_builds_with_50hz_frames():
    config = HubertConfig()  # hubert-base: 12 layers of 768, 16 kHz
    assert (config.num_hidden_layers, config.hidden_size, config.frame_rate, config.receptive_field) == (12, 768, 50.0,
                                                                                                        400)
    model = HubertFeatureModel(config, segment_samples=16000)
    assert (model.sample_rate, model.frame_rate, model.num_layers, model.feature_converter_name) == (
        16000, 50.0, 12, "audio")
    assert model.input_shapes(2) == {"audio": (2, 16000)} and model.input_dtypes() == {"audio": jnp.float32}
    assert num_frames(16000) == 49 and num_frames(16000 * 30) == 1499 and num_frames(399) == 0
    variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), model.input_shapes(2)))
    params = partitioning.unbox(variables)["params"]
    assert 94e6 < sum(np.prod(p.shape) for p in jax.tree.leaves(params)) < 95e6  # hubert-base: 94.4M
    partitioning.Partitioner(partitioning.mesh_from_shape({"data": -1})).logical_specs(variables)  # names known
    hidden = jax.eval_shape(lambda p, a: model.module.apply({"params": p}, a), params,
                            jax.ShapeDtypeStruct((2, 16000), jnp.float32))
    assert len(hidden) == 13 and all(h.shape == (2, 49, 768) for h in hidden)


def test_unsupported_hubert_settings_are_named():
    with pytest.raises(UnsupportedHubertConfig, match="conv_pos_batch_norm"):
        config_from_hf(transformers.HubertConfig(conv_pos_batch_norm=True))
    with pytest.raises(UnsupportedHubertConfig, match="feature_extractor_cqt"):  # MERT's CQT input features
        config_from_hf(transformers.HubertConfig(feature_extractor_cqt=True, attention_relax=32.0))
    mert = config_from_hf(transformers.HubertConfig(feature_extractor_cqt=False, attention_relax=32.0,
                                                    sample_rate=24000))
    assert (mert.sample_rate, mert.frame_rate) == (24000, 75.0)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        convert_main(["hubert", "--from", "/nonexistent/hubert", "--to", "/tmp/unused"])
