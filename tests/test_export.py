"""Export bundles (musiclm_jax.export) and generation from them (musiclm_jax.serving) on tiny random-init models:
the bundle's audio is bit-identical to MusicLM.generate's (sliding windows, guidance 3, several prompts), served
from another process that imports neither Flax, gin, orbax nor TensorFlow; the exported functions take any batch
size; continuation and reranking through the exported encoders are MusicLM's too; the bundle holds parameters
only; a wrong format version, a missing or corrupt file fail at load naming it;
the TF SavedModels (--saved_model) match JAX."""
import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_DIR, subprocess_env
from helpers import planned_token_dir
from musiclm_jax import checkpoint_loading, export, gin_utils, partitioning, run_directory
from musiclm_jax.generation import pipeline
from musiclm_jax.serving import bundle as serving
from musiclm_jax.generation import stage_sampling

PROMPTS = ["a calm piano melody", "loud rock drums and distorted guitar", "slow waltz on strings"]
# 2.4 s: 60 semantic frames (window 50), 120 codec frames (coarse window 100, fine window 50): every stage slides.
SETTINGS = {"duration_s": 2.4, "seed": 7, "guidance_scale": 3.0}
CHECKPOINTS = [f"--gin.{n}_CHECKPOINT='/unused'" for n in ("MULAN", "CODEC", "SEMANTIC", "COARSE", "FINE")]


# ------------------------------------------------------------------------------------------------ tiny models
def gin_model(gin_file: str):
    gin_utils.parse_gin([gin_file], ["MODEL_DIR = '/unused'", f"TOKEN_DIR = '{planned_token_dir()}'"],
                        finalize=False)
    try:
        return gin_utils.bound_arguments("train", ["model"], {})["model"]
    finally:
        gin.clear_config()


def random_like(shapes, seed: int, scale: float = 0.05):
    """Random normal numpy arrays of the shapes (no XLA compilation, unlike running the initialisers)."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def tiny_musiclm(root, stage_dirs=None) -> pipeline.MusicLM:
    """MusicLM of the tiny configs with random weights: the codec and MuLan (with a caption vocabulary trained on
    the synthetic captions and a random RVQ) in memory; the stages from `stage_dirs` ({name: run directory}) if
    given, else in memory."""
    from musiclm_jax.mulan import text_vocab
    from musiclm_jax.codec.inference import Codec
    from musiclm_jax.data import synthetic_music
    from musiclm_jax.mulan.inference import ConditioningRVQ, MuLan
    codec_model = gin_model("gin/codec/tiny.gin")
    audio = jnp.zeros((1, 4 * codec_model.seanet.hop_length), jnp.float32)
    codec_vars = jax.eval_shape(lambda: partitioning.unbox(codec_model.generator.init({"params": jax.random.key(0)},
                                                                                      audio)))
    codec = Codec(codec_model.generator, random_like(codec_vars, 1), codec_model.sample_rate)
    mulan_model = gin_model("gin/mulan/tiny.gin")
    mulan_vars = jax.eval_shape(lambda: partitioning.unbox(mulan_model.get_initial_variables(
        jax.random.key(0), mulan_model.input_shapes(1))))
    vocab = text_vocab.train_sentencepiece([synthetic_music.clip_caption(i) for i in range(500)],
                                           os.path.join(str(root), "text_vocab", "spm.model"), 512)
    rvq = ConditioningRVQ(0.1 * np.random.RandomState(2).standard_normal((12, 32, mulan_model.network.embed_dim)))
    mulan = MuLan(mulan_model, random_like(mulan_vars["params"], 2), text_vocab.TextTokenizer(vocab), rvq)
    stages = []
    for i, name in enumerate(pipeline.STAGES):
        if stage_dirs:
            stages.append(stage_sampling.Stage.from_checkpoint(str(stage_dirs[name]), name))
        else:
            model = gin_model(f"gin/stages/{name}_tiny.gin")
            shapes = jax.eval_shape(lambda: partitioning.unbox(model.get_initial_variables(
                jax.random.key(0), model.input_shapes(1))))
            stages.append(stage_sampling.Stage(model, random_like(shapes["params"], 3 + i), name))
    return pipeline.MusicLM(mulan, codec, *stages, log=None, semantic_tokenizer=tiny_semantic_tokenizer())


def tiny_semantic_tokenizer():
    """The tiny w2v-BERT (random weights), layer 3 with the pitch-class profile, and 64 random k-means centres
    (the tiny semantic stage's vocabulary), as gin/semantic/kmeans_tiny.gin fits them: what continuation needs."""
    from musiclm_jax.semantic import inference as semantic
    model = gin_model("gin/w2v_bert/tiny.gin")
    shapes = jax.eval_shape(lambda: partitioning.unbox(model.get_initial_variables(jax.random.key(0),
                                                                                   model.input_shapes(1))))
    features = semantic.FeatureExtractor(model, random_like(shapes["params"], 6), 3, pitch_classes=True)
    dim, rng = model.network.embed_dim + 12, np.random.RandomState(7)
    return semantic.SemanticTokenizer(features, rng.standard_normal(dim) * 0.1, 1 + rng.random_sample(dim),
                                      rng.standard_normal((64, dim)), pitch_class_share=0.75)


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    """Run directories of the three tiny stages, as training writes them (optimizer state included)."""
    root = tmp_path_factory.mktemp("export_stages")
    for i, name in enumerate(pipeline.STAGES):
        run_directory.write_run_directory(str(root / name), f"gin/stages/{name}_tiny.gin",
                                               [f"TOKEN_DIR = '{planned_token_dir()}'"], seed=3 + i)
    return {name: root / name for name in pipeline.STAGES}


@pytest.fixture(scope="module")
def musiclm(tmp_path_factory, stage_dirs):
    return tiny_musiclm(tmp_path_factory.mktemp("export_models"), stage_dirs)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, musiclm):
    """`python -m musiclm_jax.export --gin_file=gin/sample/musiclm.gin ... --saved_model`, with the run
    directories' loading (MusicLM.from_checkpoints, tested in test_pipeline) handing back the models above: the
    codec's and MuLan's run directories would cost minutes of compilation to write here."""
    out = tmp_path_factory.mktemp("bundle_parent") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.MusicLM, "from_checkpoints", classmethod(lambda cls, *a, **k: musiclm))
        manifest = export.main(["--gin_file=gin/sample/musiclm.gin", *CHECKPOINTS,
                                "--gin.generate.load_musiclm.duration_s=2.4", "--gin.generate.load_musiclm.seed=7",
                                "--saved_model", f"--output_dir={out}"])
    assert manifest["format_version"] == serving.FORMAT_VERSION
    return out


# ------------------------------------------------------------------------------------------------ round trip
SERVE_SCRIPT = """
import json, sys
import numpy as np
from musiclm_jax.serving import bundle as serving
model = serving.load(sys.argv[1])
audio = model.generate(json.loads(sys.argv[2]))
np.save(sys.argv[3], audio)
print(json.dumps({"params": {k: v for k, v in vars(model.params).items()}, "sample_rate": model.sample_rate,
                  "imported": sorted(m for m in ("flax", "gin", "orbax", "tensorflow", "seqio", "musiclm_jax.models",
                                                 "musiclm_jax.checkpoint_loading") if m in sys.modules)}))
"""


def test_bundle_audio_is_bit_identical_to_musiclm_generate(musiclm, bundle, tmp_path):
    # The served side runs in its own process (started first: the two compile in parallel), from the bundle
    # alone, with the bundle's default settings (generation.json: the gin settings with duration and seed set).
    served_file = tmp_path / "served.npy"
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(bundle), json.dumps(PROMPTS), str(served_file)],
                            cwd=REPO_DIR, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        musiclm.set_generation_params(temperature=(1.0, 0.95, 0.4), top_k=0, top_p=1.0, **SETTINGS)
        audio = musiclm.generate(PROMPTS)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["imported"] == []
    assert report["params"]["guidance_scale"] == 3.0 and report["params"]["duration_s"] == 2.4
    assert report["sample_rate"] == 24000
    assert audio.shape == (3, int(2.4 * 24000)) and np.all(np.isfinite(audio)) and np.std(audio) > 0
    np.testing.assert_array_equal(np.load(served_file), audio)


def test_a_bundle_follows_a_melody_as_musiclm_generate_does(musiclm, bundle):
    """The served semantic stage (its spec read back from the bundle's layouts) gets the melody of each frame and
    drops it in guidance's unconditional input, as the native one does: the same audio for the same seed."""
    from musiclm_jax.data import synthetic_music
    served = serving.load(str(bundle))
    tune = synthetic_music.generate_clip(3, seconds=SETTINGS["duration_s"], sample_rate=24000)["audio"]
    for model in (served, musiclm):
        model.set_generation_params(temperature=(1.0, 0.95, 0.4), top_k=0, top_p=1.0, **SETTINGS)
    audio = musiclm.generate(PROMPTS[:1], melody=tune)
    np.testing.assert_array_equal(served.generate(PROMPTS[:1], melody=tune), audio)
    assert not np.array_equal(audio, musiclm.generate(PROMPTS[:1]))  # the melody changed the music


def test_a_bundle_continues_and_reranks_as_musiclm_does(musiclm, bundle):
    """The exported encoders (codec encoder, w2v-BERT layer + k-means, MuLan audio tower): a continuation and a
    reranked generation give MusicLM's audio bit for bit, and the same MuLan scores and choice."""
    from musiclm_jax.data import synthetic_music
    served = serving.load(str(bundle))
    assert all(not served.missing(f) for f in ("continuation", "rerank"))
    clip = synthetic_music.generate_clip(4, seconds=0.9, sample_rate=24000)["audio"]
    for model in (served, musiclm):
        model.set_generation_params(temperature=(1.0, 0.95, 0.4), top_k=0, top_p=1.0, **SETTINGS)
    want = musiclm.generate_continuation(clip, PROMPTS[:2])
    np.testing.assert_array_equal(served.generate_continuation(clip, PROMPTS[:2]), want)
    audio = np.stack([clip, clip[::-1]])
    np.testing.assert_array_equal(served.musiclm.codec.encode(audio), musiclm.codec.encode(audio))
    tokenizer = served.musiclm.semantic_tokenizer
    resampled = np.random.RandomState(0).uniform(-0.5, 0.5, (2, 640 * 23)).astype(np.float32)
    np.testing.assert_array_equal(tokenizer.tokenize(resampled), musiclm.semantic_tokenizer.tokenize(resampled))
    np.testing.assert_array_equal(served.musiclm.mulan.embed_audio(audio[:, :16000]),
                                  musiclm.mulan.embed_audio(audio[:, :16000]))
    want = musiclm.generate(PROMPTS[:2], rerank=2, return_details=True)
    got = served.generate(PROMPTS[:2], rerank=2, return_details=True)
    np.testing.assert_array_equal(got.audio, want.audio)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.choice, want.choice)


def _protocol_problems(obj, protocol) -> list[str]:
    """What `obj` lacks of `protocol` (musiclm_jax.interfaces): a member, or a method whose parameters do not
    start with the protocol's (by name) or whose extra parameters have no default."""
    import inspect
    problems = []
    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        wanted = list(inspect.signature(member).parameters)[1:]
        have = list(inspect.signature(getattr(obj, name)).parameters.values())
        if [p.name for p in have[:len(wanted)]] != wanted or any(
                p.default is inspect.Parameter.empty for p in have[len(wanted):]):
            problems.append(f"{type(obj).__name__}.{name}{inspect.signature(getattr(obj, name))} does not take "
                            f"{protocol.__name__}.{name}'s {wanted}")
    for name in [*protocol.__annotations__, *(n for n, v in vars(protocol).items() if isinstance(v, property))]:
        if not hasattr(obj, name):
            problems.append(f"{type(obj).__name__} has no {name}")
    return problems


def test_inference_classes_and_served_parts_implement_the_interfaces(musiclm, bundle):
    from musiclm_jax import interfaces
    from musiclm_jax.codec import Codec
    from musiclm_jax.mulan import MuLan
    from musiclm_jax.semantic import SemanticTokenizer
    served = serving.load(str(bundle)).musiclm
    expected = {"inference": (Codec, MuLan, SemanticTokenizer, stage_sampling.Stage),
                "served": (serving.ServedCodec, serving.ServedMuLan, serving.ServedSemanticTokenizer,
                           serving.ServedStage)}
    for family, model in (("inference", musiclm), ("served", served)):
        parts = [(interfaces.Codec, model.codec), (interfaces.MuLan, model.mulan),
                 (interfaces.SemanticTokenizer, model.semantic_tokenizer)]
        parts += [(interfaces.Stage, stage) for stage in model.stages.values()]
        for (protocol, part), cls in zip(parts, expected[family] + (expected[family][-1],) * 2):
            assert type(part) is cls, (family, protocol.__name__, type(part))
            assert isinstance(part, protocol), (family, protocol.__name__)
            assert _protocol_problems(part, protocol) == [], family
    # The check can fail: a codec without decode, a tokenizer whose tokenize needs another argument.
    assert not isinstance(object(), interfaces.Codec)

    class NoDefault:
        sample_rate, frame_rate = 16000, 25.0

        def tokenize(self, audio, layer):
            return audio
    assert _protocol_problems(NoDefault(), interfaces.SemanticTokenizer) != []


def test_exported_functions_have_a_symbolic_batch(musiclm, bundle):
    served = serving.load(str(bundle))
    for name in serving.function_parts():
        exported = serving.load_function(str(bundle), name)
        params = jax.tree.leaves(jax.tree.unflatten(exported.in_tree, exported.in_avals)[0][0])
        first_arg = exported.in_avals[len(params)]
        assert str(first_arg.shape[0]) in ("b", "4*b"), (name, first_arg)
    codec = served.musiclm.codec
    rng = np.random.RandomState(0)
    for batch, frames in ((1, 7), (3, 20)):
        codes = rng.randint(0, 64, (batch, frames, 4)).astype(np.int32)
        np.testing.assert_array_equal(codec.decode(codes), musiclm.codec.decode(codes))
    for texts in (PROMPTS[:1], PROMPTS):
        np.testing.assert_array_equal(served.musiclm.mulan.tokens_from_text(texts),
                                      musiclm.mulan.tokens_from_text(texts))
    # A stage's prefill and step, exported and native, for two batch sizes.
    stage, native = served.musiclm.stages["fine"], musiclm.stages["fine"]
    (prefill, step), (native_prefill, native_step) = stage.decoder_functions(), native.decoder_functions()
    for batch in (1, 2):
        tokens = rng.randint(1, 129, (batch, 9)).astype(np.int32)
        mask, slots = np.arange(9)[None].repeat(batch, 0) < 5, np.zeros((12,), np.int8)
        logits, cache = jax.jit(prefill)(stage.params, tokens, mask, slots)
        want_logits, want_cache = jax.jit(native_prefill)(native.params, tokens, mask, slots)
        np.testing.assert_array_equal(logits, want_logits)
        assert logits.shape[0] == batch
        logits, _ = jax.jit(step)(stage.params, tokens[:, :1], cache)
        np.testing.assert_array_equal(logits, jax.jit(native_step)(native.params, tokens[:, :1], want_cache)[0])


def test_bundle_holds_parameters_only(musiclm, bundle, stage_dirs):
    manifest = json.loads((bundle / "bundle.json").read_text())
    for name in pipeline.STAGES:
        loaded = checkpoint_loading.load_model(str(stage_dirs[name]))
        # the checkpoint has optimizer state ...
        assert len(jax.tree.leaves(checkpoint_loading.saved_tree(str(stage_dirs[name]))["opt_state"])) > 0
        with np.load(bundle / serving.params_file(name)) as f:  # ... the bundle only the parameters
            keys = sorted(k for k in f.files if k != "__dtypes__")
            want = {"/".join(k.key for k in path): leaf
                    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(loaded.params))[0]}
            assert keys == sorted(want)
            for k in keys:
                np.testing.assert_array_equal(f[k], want[k])
    with np.load(bundle / serving.params_file("codec")) as f:  # the decoder and the codebooks only
        keys = [k for k in f.files if k != "__dtypes__"]
        assert keys and all(k.startswith("params/decoder/") or k == "quantizer/quantizer/codebook" for k in keys)
        assert "quantizer/quantizer/codebook" in keys
    with np.load(bundle / serving.params_file("mulan")) as f:  # the text tower only
        assert f.files and not any("audio" in k or "logit_scale" in k for k in f.files)
    with np.load(bundle / serving.params_file("mulan_audio")) as f:  # the audio tower apart
        assert f.files and not any("text" in k for k in f.files)
    with np.load(bundle / serving.params_file("codec_encoder")) as f:  # the encoder and codebooks, no decoder
        keys = [k for k in f.files if k != "__dtypes__"]
        assert keys and all(k.startswith("params/encoder/") or k.startswith("quantizer/") for k in keys)
    assert set(serving.ENCODER_FUNCTIONS) <= set(manifest["functions"])
    for path in manifest["files"]:
        assert not any(word in path for word in ("opt_state", "checkpoint", "discriminator"))
    assert json.loads((bundle / serving.GENERATION_FILE).read_text())["duration_s"] == 2.4
    assert "generate.load_musiclm" in (bundle / serving.CONFIG_FILE).read_text()
    assert (bundle / manifest["mulan"]["tokenizer"]).exists()
    layouts = json.loads((bundle / serving.LAYOUTS_FILE).read_text())
    assert layouts["coarse"]["guidance_groups"] == ["mulan"] and layouts["fine"]["target_group"] == "fine"
    assert layouts["semantic"]["guidance_groups"] == ["mulan", "melody"]  # guidance drops the optional melody too


def test_load_names_a_wrong_version_and_a_missing_or_corrupt_file(bundle, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("saved_model"))
        manifest = json.loads((target / "bundle.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("saved_model/")}
        (target / "bundle.json").write_text(json.dumps(manifest))
        return target
    serving.load(str(copy("intact")))
    wrong = copy("version")
    manifest = json.loads((wrong / "bundle.json").read_text())
    manifest["format_version"] = 2
    (wrong / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(serving.BundleError, match="bundle.json: bundle format_version 2, but this musiclm_jax reads "
                                                  "format_version 1"):
        serving.load(str(wrong))
    missing = copy("missing")
    os.remove(missing / "exported" / "fine_step.jaxexp")
    with pytest.raises(serving.BundleError, match="exported/fine_step.jaxexp: missing file"):
        serving.load(str(missing))
    corrupt = copy("corrupt")
    data = bytearray((corrupt / "params" / "coarse.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "params" / "coarse.npz").write_bytes(bytes(data))
    with pytest.raises(serving.BundleError, match="params/coarse.npz: SHA-256 checksum differs"):
        serving.load(str(corrupt))
    truncated = copy("truncated")
    (truncated / "vocab" / "token_layouts.json").write_text("{}")
    with pytest.raises(serving.BundleError, match="token_layouts.json: 2 bytes, but bundle.json lists"):
        serving.load(str(truncated))
    with pytest.raises(serving.BundleError, match="bundle.json not found"):
        serving.load(str(tmp_path))


def test_saved_models_match_jax(musiclm, bundle):
    tf = pytest.importorskip("tensorflow")
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["saved_model"] == sorted(serving.PARTS)
    # The codec decoder: TF runs the same StableHLO through its own XLA; observed max |diff| ~1.5e-6.
    codec = tf.saved_model.load(str(bundle / "saved_model" / "codec"))
    codes = np.random.RandomState(1).randint(0, 64, (2, 30, 4)).astype(np.int32)
    audio = codec.signatures["decode"](codes=tf.constant(codes))["audio"].numpy()
    np.testing.assert_allclose(audio, musiclm.codec.decode(codes), rtol=0, atol=1e-5)
    # The fine stage's decoding step on the cache of a JAX prefill.
    stage = musiclm.stages["fine"]
    prefill, step = stage.decoder_functions()
    tokens = np.random.RandomState(2).randint(1, 129, (2, 9)).astype(np.int32)
    _, cache = jax.jit(prefill)(stage.params, tokens, np.arange(9)[None].repeat(2, 0) < 5, np.zeros((12,), np.int8))
    want, _ = jax.jit(step)(stage.params, tokens[:, :1], cache)
    inputs = {"tokens": tf.constant(tokens[:, :1])}
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        inputs["cache_" + "_".join(k.key for k in path)] = tf.constant(np.asarray(leaf))
    fine = tf.saved_model.load(str(bundle / "saved_model" / "fine"))
    got = fine.signatures["step"](**inputs)["logits"].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_cli_errors(tmp_path):
    with pytest.raises(gin_utils.FlagError, match="--output_dir is required"):
        export.main(["--gin_file=gin/sample/musiclm.gin", *CHECKPOINTS])
    with pytest.raises(gin_utils.FlagError, match="--saved_model=maybe"):
        export.main(["--saved_model=maybe"])
    (tmp_path / "notes.txt").write_text("not a bundle")
    with pytest.raises(FileExistsError, match="not a serving bundle"):
        export.write_bundle(None, str(tmp_path))
