"""MuLan: the contrastive loss against numpy, global-batch negatives identical on one device and a (2, 4) mesh,
windowed clip embeddings, the conditioning RVQ, and training on the embedded captioned music (retrieval far above
chance, tokens from audio and text, the CLI and the eval entry point)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_DIR, subprocess_env, train_on_one_device
from helpers import mesh
from musiclm_jax.mulan import __main__ as mulan_cli
from musiclm_jax.mulan import inference as mulan_lib
from musiclm_jax.fit_rvq import fit_rvq
from musiclm_jax import partitioning
from musiclm_jax.data import synthetic_music
from musiclm_jax.mulan.model import MuLanModel, contrastive_loss
from musiclm_jax.networks.audio_towers import ResNetConfig, ViTConfig
from musiclm_jax.networks.bert import BertConfig
from musiclm_jax.networks.mulan import MuLanConfig
from musiclm_jax.mulan.text_vocab import TextTokenizer


def _numpy_loss(audio, text, scale):
    logits = scale * text.astype(np.float64) @ audio.astype(np.float64).T

    def ce(l):
        l = l - l.max(axis=1, keepdims=True)
        return -np.mean(np.diagonal(l) - np.log(np.exp(l).sum(axis=1)))
    return 0.5 * (ce(logits) + ce(logits.T))


def test_contrastive_loss_equals_a_numpy_reference():
    rng = np.random.RandomState(0)
    audio, text = rng.randn(2, 12, 16)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    for log_scale in (np.log(1 / 0.07), np.log(1000.0)):  # the second is clamped to 100
        loss, metrics = contrastive_loss(jnp.asarray(audio, jnp.float32), jnp.asarray(text, jnp.float32),
                                         jnp.float32(log_scale))
        want = _numpy_loss(audio, text, min(np.exp(log_scale), 100.0))
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["temperature"]) == pytest.approx(0.01)


def _tiny_model(audio_tower):
    text = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16, max_length=16, pooling="mean")
    return MuLanModel(MuLanConfig(audio=audio_tower, text=text, embed_dim=16), segment_samples=8000, text_length=16)


@pytest.mark.parametrize("tower", ["resnet", "vit"])
def test_global_batch_loss_and_gradients_are_the_same_on_a_2x4_mesh(tower):
    audio_tower = (ResNetConfig(stage_sizes=(1, 1), width=8, norm_groups=4) if tower == "resnet" else
                   ViTConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_frames=64))
    model = _tiny_model(audio_tower)
    rng = np.random.RandomState(1)
    batch = {"audio": (0.1 * rng.randn(8, 8000)).astype(np.float32),
             "text_tokens": rng.randint(1, 40, (8, 16)).astype(np.int32)}
    batch["text_tokens"][:, 10:] = 0  # padding
    boxed = model.get_initial_variables(jax.random.key(0), model.input_shapes(8))
    params = partitioning.unbox(boxed)["params"]

    def loss_and_grads(p, b):
        return jax.value_and_grad(lambda q: model.loss_fn(q, b, None)[0])(p)

    loss, grads = jax.jit(loss_and_grads)(params, batch)
    partitioner = partitioning.Partitioner(mesh(2, 4))
    shardings = partitioner.logical_to_sharding(partitioner.logical_specs(boxed))["params"]
    batch_shardings = {k: partitioner.batch_sharding(v.ndim) for k, v in batch.items()}
    with partitioner.activate():
        sharded = partitioner.jit(loss_and_grads, in_shardings=(shardings, batch_shardings),
                                  out_shardings=(partitioner.replicated(), shardings))
        loss_mesh, grads_mesh = sharded(jax.device_put(params, shardings), jax.device_put(batch, batch_shardings))
    # Every example's negatives are all 8 examples, though each device holds 4 of them.
    np.testing.assert_allclose(float(loss_mesh), float(loss), rtol=1e-5)
    flat, flat_mesh = jax.tree.leaves(grads), jax.tree.leaves(grads_mesh)
    for g, gm in zip(flat, flat_mesh):
        np.testing.assert_allclose(np.asarray(gm), np.asarray(g), atol=1e-5, rtol=1e-4)
    assert float(loss) > 0.5 and max(float(jnp.max(jnp.abs(g))) for g in flat) > 0  # a real loss with gradients


def test_window_starts_cover_the_clip():
    assert mulan_lib.window_starts(100, 100, 10) == [0]
    assert mulan_lib.window_starts(125, 100, 10) == [0, 10, 20, 25]
    assert mulan_lib.window_starts(50, 100, 10) == [0]


def test_residual_vq_quantizes_level_by_level():
    rng = np.random.RandomState(0)
    points = rng.randn(512, 8).astype(np.float32)
    rvq = mulan_lib.ConditioningRVQ.fit(points, levels=3, codebook_size=16, steps=10, batch_size=256)
    codes = rvq.quantize(points)
    assert codes.shape == (512, 3) and codes.dtype == np.int32 and 0 <= codes.min() and codes.max() < 16
    errors = [np.mean(np.sum((points - rvq.reconstruct(codes[:, :n])) ** 2, axis=1)) for n in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]  # each level removes more of the residual
    with pytest.raises(ValueError, match="needs >= 16 embeddings"):
        mulan_lib.ConditioningRVQ.fit(points[:8], levels=1, codebook_size=16)


# ------------------------------------------------------------------------------------ training (one fixture)

TRAIN_STEPS = 160


@pytest.fixture(scope="module")
def trained_mulan(tmp_path_factory):
    """The tiny MuLan trained through the CLI on the synthetic captioned music, with a 12 x 32 RVQ fitted."""
    model_dir = str(tmp_path_factory.mktemp("mulan_tiny"))
    train_on_one_device("gin/mulan/tiny.gin", model_dir, f"--gin.TRAIN_STEPS={TRAIN_STEPS}",
                        f"--gin.train_lib.train.checkpoint_period={TRAIN_STEPS}", "--gin.BATCH_SIZE=32",
                        "--gin.WARMUP_STEPS=30", timeout=1200)
    fit_rvq(model_dir, num_clips=256, levels=12, codebook_size=32, steps=20)
    return model_dir


def test_training_lifts_text_to_audio_retrieval_far_above_chance(trained_mulan, tmp_path):
    with open(os.path.join(trained_mulan, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert losses[-1] < 0.6 * losses[0]
    proc = subprocess.run([sys.executable, "-m", "musiclm_jax.eval", "--gin_file=gin/eval/mulan.gin",
                           f"--gin.CHECKPOINT_DIR='{trained_mulan}'", f"--gin.OUTPUT_DIR='{tmp_path}'",
                           "--gin.mulan_eval.evaluate_mulan.max_examples=100"],
                          cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["num_examples"] == 100 and metrics["chance_recall_at_10"] == pytest.approx(0.1)
    for key in ("text_to_audio_recall_at_1", "text_to_audio_recall_at_5", "text_to_audio_recall_at_10",
                "audio_to_text_recall_at_1"):
        assert key in metrics
    # Chance R@1 is 0.01 on 100 held-out clips.
    assert metrics["text_to_audio_recall_at_1"] >= 0.05, metrics
    assert metrics["text_to_audio_recall_at_10"] >= 0.3, metrics
    assert metrics["mean_positive_cosine"] > metrics["mean_negative_cosine"] + 0.1


def test_tokens_from_audio_and_text_and_the_cli(trained_mulan, tmp_path):
    mulan = mulan_lib.MuLan.from_checkpoint(trained_mulan)
    clips = np.stack([synthetic_music.generate_clip(i, seed=9, seconds=6.0, sample_rate=16000)["audio"]
                      for i in range(3)])
    audio_tokens = mulan.tokens_from_audio(clips)
    text_tokens = mulan.tokens_from_text(["a calm piano piece", "loud rock drums with a distorted synth"])
    for tokens, rows in ((audio_tokens, 3), (text_tokens, 2)):
        assert tokens.shape == (rows, 12) and tokens.dtype == np.int32
        assert 0 <= tokens.min() and tokens.max() < 32
    # 6 s clips are embedded as the mean of 4 s windows at 1 s stride (starts 0, 1, 2 s).
    windows = np.stack([clips[0][s * 16000:(s + 4) * 16000] for s in (0, 1, 2)])
    mean = mulan._windows(windows).mean(axis=0)
    np.testing.assert_allclose(mulan.embed_audio(clips[0]), mean / np.linalg.norm(mean), atol=1e-5)

    import soundfile
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, clips[1], 16000, subtype="FLOAT")
    mulan_cli.main(["tokens", "--checkpoint", trained_mulan, "--input", str(wav), "--output", str(tmp_path / "t.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), audio_tokens[1])
    mulan_cli.main(["embed-text", "--checkpoint", trained_mulan, "--text", "a calm piano piece",
                    "--output", str(tmp_path / "e.npy")])
    assert np.load(tmp_path / "e.npy").shape == (1, 128)
    with pytest.raises(SystemExit):
        mulan_cli.main(["tokens", "--checkpoint", trained_mulan, "--output", str(tmp_path / "x.npy")])


def test_the_caption_vocabulary_is_made_by_prepare_assets_only(tmp_path):
    """Reading the model's input arguments never trains a vocabulary; the train job's explicit step does."""
    text = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16, max_length=16, pooling="mean")
    tower = ResNetConfig(stage_sizes=(1, 1), width=8, norm_groups=4)
    model = MuLanModel(MuLanConfig(audio=tower, text=text, embed_dim=16), segment_samples=8000, text_length=16,
                       vocabulary_dir=str(tmp_path), vocabulary_source_task="synthetic_music_16000hz")
    with pytest.raises(FileNotFoundError, match="text_vocab/spm.model does not exist: the train job makes it"):
        model.feature_converter_kwargs
    assert os.listdir(tmp_path) == []
    model.prepare_assets()
    path = model.feature_converter_kwargs["vocabulary_path"]
    assert path == str(tmp_path / "text_vocab" / "spm.model") and 8 < TextTokenizer(path).vocab_size <= 64
    stamp = os.stat(path).st_mtime_ns
    model.prepare_assets()  # already there: kept
    assert os.stat(path).st_mtime_ns == stamp


def test_short_clips_are_padded_or_repeated_to_one_window():
    from musiclm_jax.mulan.inference import pad_to_window
    from musiclm_jax.mulan.model import MuLanModel
    clip = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(pad_to_window(clip, 8), [[1, 2, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(pad_to_window(clip, 8, "repeatpad"), [[1, 2, 3, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(pad_to_window(clip, 3, "repeatpad"), clip)
    with pytest.raises(ValueError, match="4 samples for a window of 3"):
        pad_to_window(np.zeros((1, 4), np.float32), 3)
    with pytest.raises(ValueError, match="short_clip_padding='repeat'"):
        MuLanModel(None, 16000, 8, short_clip_padding="repeat")
