"""w2v-BERT: span masking statistics, negatives, the contrastive loss by hand, 25 Hz frames, and 200 steps of
training through the CLI lowering both losses."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_on_one_device
from helpers import adam_steps
from musiclm_jax import gin_utils
from musiclm_jax import train  # noqa: F401  (the run files bind train_lib.train)
from musiclm_jax.networks.w2v_bert import W2VBertConfig
from musiclm_jax.semantic.w2v_bert_model import contrastive_loss, sample_negatives, span_mask

TRAIN_STEPS = 200
# Means of the last 10 of 200 steps against the first 10 (observed ratios: contrastive ~0.8, MLM ~0.45).
CONTRASTIVE_RATIO_BELOW = 0.9
MLM_RATIO_BELOW = 0.75


def test_span_masking_statistics():
    p, span = 0.065, 10
    mask = np.asarray(span_mask(jax.random.key(0), 256, 400, p, span))
    interior = mask[:, span:].mean()  # away from the start every frame has `span` possible span starts
    assert interior == pytest.approx(1 - (1 - p) ** span, abs=0.01)  # 0.489
    # Masked runs are whole spans: every run inside the clip is at least `span` long.
    for row in mask[:32]:
        padded = np.concatenate([[False], row, [False]])
        starts, ends = np.flatnonzero(~padded[:-1] & padded[1:]), np.flatnonzero(padded[:-1] & ~padded[1:])
        for s, e in zip(starts, ends):
            if 0 < s and e < len(row):  # a run cut by the end of the clip may be shorter
                assert e - s >= span
    assert not np.asarray(span_mask(jax.random.key(1), 4, 50, 0.0, span)).any()


def test_negatives_are_other_masked_frames_of_the_same_example():
    mask = np.asarray(span_mask(jax.random.key(2), 8, 120, 0.05, 10))
    negatives = np.asarray(sample_negatives(jax.random.key(3), jnp.asarray(mask), 30))
    for b in range(8):
        for t in np.flatnonzero(mask[b]):
            assert mask[b, negatives[b, t]].all()
            if mask[b].sum() >= 2:
                assert (negatives[b, t] != t).all()
    # Uniform over the other masked frames: every one of them is drawn for a long enough draw.
    masked = np.flatnonzero(mask[0])
    many = np.asarray(sample_negatives(jax.random.key(4), jnp.asarray(mask[:1]), 2000))[0, masked[0]]
    assert set(many) == set(masked[1:])


def test_contrastive_loss_matches_a_hand_computation():
    rng = np.random.RandomState(0)
    context, targets = rng.randn(1, 4, 3), rng.randn(1, 4, 3)
    mask = np.array([[True, False, True, True]])
    negatives = np.array([[[2, 3], [0, 0], [0, 3], [0, 2]]])
    loss, accuracy = contrastive_loss(jnp.asarray(context), jnp.asarray(targets), jnp.asarray(mask),
                                      jnp.asarray(negatives), 0.5)
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    nll, correct = [], []
    for t in (0, 2, 3):
        candidates = [t] + list(negatives[0, t])
        logits = np.array([unit(context[0, t]) @ unit(targets[0, j]) for j in candidates]) / 0.5
        nll.append(np.log(np.exp(logits).sum()) - logits[0])
        correct.append(np.argmax(logits) == 0)
    assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
    assert float(accuracy) == pytest.approx(np.mean(correct))


def test_frames_are_25_hz_and_embeddings_have_the_model_width():
    assert W2VBertConfig().frame_rate == 25.0
    gin_utils.parse_gin(["gin/w2v_bert/tiny.gin"], ["MODEL_DIR = '/tmp/unused'"])
    model = gin_utils.bound_arguments("train", ["model"], {})["model"]
    variables = model.get_initial_variables(jax.random.key(0), model.input_shapes(1))
    for seconds in (1, 3):
        audio = jnp.zeros((2, 16000 * seconds), jnp.float32)
        emb = model.embed(variables["params"], audio, layer=3)
        assert emb.shape == (2, 25 * seconds, model.network.embed_dim)
    assert model.network.num_frames(16000 + 1) == 26  # a partial frame is padded
    with pytest.raises(ValueError, match="layers 0..4"):
        model.embed(variables["params"], audio, layer=5)
    paper = W2VBertConfig()
    assert (paper.num_layers, paper.embed_dim, paper.num_contrastive_layers) == (24, 1024, 12)


@pytest.fixture(scope="module")
def trained_tiny_w2v_bert(tmp_path_factory):
    """200 steps of tiny w2v-BERT through the training CLI on the synthetic music, one CPU device."""
    return train_on_one_device("gin/w2v_bert/tiny.gin", str(tmp_path_factory.mktemp("w2v_bert_tiny")),
                               f"--gin.TRAIN_STEPS={TRAIN_STEPS}", "--gin.train_lib.train.checkpoint_period=200")


def test_training_lowers_both_losses(trained_tiny_w2v_bert):
    with open(os.path.join(trained_tiny_w2v_bert, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))
    for r in records:
        assert all(np.isfinite(v) for v in r.values()), r
    first = {k: np.mean([r[k] for r in records[:10]]) for k in ("contrastive_loss", "mlm_loss")}
    last = {k: np.mean([r[k] for r in records[-10:]]) for k in ("contrastive_loss", "mlm_loss")}
    print("w2v-BERT first/last 10 steps:", first, last)
    assert last["contrastive_loss"] < CONTRASTIVE_RATIO_BELOW * first["contrastive_loss"], (first, last)
    assert last["mlm_loss"] < MLM_RATIO_BELOW * first["mlm_loss"], (first, last)
    assert last["contrastive_loss"] < np.log(1 + 20)  # better than chance among 1 + 20 candidates
    assert np.mean([r["codes_used"] for r in records[-10:]]) >= 8  # the targets did not collapse (~15 of 64)
    assert 0.2 < np.mean([r["mask_fraction"] for r in records]) < 0.35  # 1 - (1 - 0.065)^5 = 0.29


# ------------------------------------------------------------------------------------------- pitch target


def test_pitch_target_marks_the_sounding_note_on_frames_aligned_with_the_network():
    from musiclm_jax.semantic.w2v_bert_model import pitch_target
    cfg = W2VBertConfig()
    t = np.arange(16000) / 16000
    audio = jnp.asarray(np.stack([0.3 * np.sin(2 * np.pi * 440.0 * t),                      # A4 = MIDI 69
                                  0.3 * np.sin(2 * np.pi * 261.63 * t)]).astype(np.float32))  # C4 = MIDI 60
    frames = cfg.num_frames(16000)
    target = np.asarray(pitch_target(audio, 16000, frames, cfg.samples_per_frame, bins=72, lowest_midi=36))
    assert target.shape == (2, frames, 72) == (2, 25, 72)
    inner = slice(2, -2)  # edge frames see the zero padding
    assert np.all(np.argmax(target[0, inner], axis=-1) == 69 - 36)
    assert np.all(np.argmax(target[1, inner], axis=-1) == 60 - 36)
    np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-4)  # standardized over the notes of each frame
    np.testing.assert_allclose(target.std(-1), 1.0, atol=1e-3)


def test_the_pitch_head_learns_the_pitch_target():
    """A w2v-BERT with pitch_bins: the pitch loss is part of the loss and falls in 60 steps (in process)."""
    from musiclm_jax.data import synthetic_music
    from musiclm_jax.networks.quantizers import STATE
    from musiclm_jax.semantic.w2v_bert_model import W2VBertModel
    cfg = W2VBertConfig(n_mels=40, subsampling_channels=8, embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                        num_contrastive_layers=1, num_mlm_layers=1, codebook_size=16, contrastive_dim=32,
                        dropout_rate=0.0, pitch_bins=48, pitch_layer=1)
    model = W2VBertModel(cfg, 16000, mask_span=3, num_negatives=5, pitch_weight=1.0, pitch_lowest_midi=48)
    audio = jnp.asarray(np.stack([synthetic_music.generate_clip(i, seed=4, seconds=1.0, sample_rate=16000)["audio"]
                                  for i in range(4)]))
    variables = model.get_initial_variables(jax.random.key(0), {"audio": (4, 16000)})
    params, mutables = variables["params"], {STATE: variables[STATE]}
    assert "pitch_head" in params
    _, _, history = adam_steps(model, params, mutables, {"audio": audio}, steps=60, learning_rate=3e-3)
    losses = []
    for metrics in history:
        losses.append(float(metrics["pitch_loss"]))
        expected = (metrics["contrastive_loss"] + 0.1 * metrics["diversity_loss"] + metrics["mlm_loss"]
                    + metrics["pitch_loss"])
        assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    with pytest.raises(ValueError, match="pitch_layer=5"):
        bad = W2VBertModel(W2VBertConfig(embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_contrastive_layers=1,
                                         num_mlm_layers=1, codebook_size=16, contrastive_dim=32, pitch_bins=8,
                                         pitch_layer=5, subsampling_channels=8, n_mels=40), 16000)
        bad.get_initial_variables(jax.random.key(0), {"audio": (1, 16000)})


# ------------------------------------------------------------------------------------------- note front end


def _small_config(**overrides) -> W2VBertConfig:
    sizes = dict(n_mels=40, subsampling_channels=8, embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                 num_contrastive_layers=1, num_mlm_layers=1, codebook_size=16, contrastive_dim=32, dropout_rate=0.0)
    return W2VBertConfig(**{**sizes, **overrides})


def test_the_note_front_end_adds_a_linear_map_of_the_note_spectrogram_to_the_features():
    """note_bins > 0: features = LayerNorm(mel path + notes @ note_project); with that kernel at 0 they equal the
    mel-only network's, and the notes are the frame-centred note spectrogram."""
    from musiclm_jax import spectral
    from musiclm_jax.networks.w2v_bert import FeatureEncoder
    with_notes = _small_config(note_bins=24, note_lowest_midi=36, note_window=2048)
    t = np.arange(24000) / 16000
    audio = jnp.asarray(np.stack([0.3 * np.sin(2 * np.pi * 110.0 * t), 0.3 * np.sin(2 * np.pi * 116.54 * t)]),
                        jnp.float32)  # A2 and A#2: 6.5 Hz apart, inside one 40 Hz bin of the 25 ms mel window
    from musiclm_jax.partitioning import unbox
    encoder = FeatureEncoder(with_notes)
    params = unbox(encoder.init(jax.random.key(0), audio)["params"])
    kernel = np.asarray(params["note_project"]["kernel"])
    assert kernel.shape == (24, 32)
    plain_params = {k: v for k, v in params.items() if k != "note_project"}
    plain = FeatureEncoder(_small_config()).apply({"params": plain_params}, audio)
    zeroed = jax.tree_util.tree_map(lambda x: x, params)
    zeroed["note_project"] = {"kernel": jnp.zeros_like(params["note_project"]["kernel"])}
    np.testing.assert_allclose(np.asarray(encoder.apply({"params": zeroed}, audio)), np.asarray(plain), atol=1e-6)
    features = np.asarray(encoder.apply({"params": params}, audio))
    assert features.shape == plain.shape == (2, with_notes.num_frames(24000), 32)
    notes = np.asarray(spectral.note_spectrogram(audio, 16000, features.shape[1], with_notes.samples_per_frame, 24,
                                                 36, 2048))
    inner = slice(2, -2)
    assert np.all(np.argmax(notes[0, inner], -1) == 45 - 36) and np.all(np.argmax(notes[1, inner], -1) == 46 - 36)
    # The note path is live: it moves the features (a stationary tone's mel path, normalised per band over time,
    # is nearly flat, so here the notes are most of what tells the two tones apart).
    assert np.abs(features - np.asarray(plain)).mean() > 0.1


def test_pitch_class_profile_names_the_class_in_any_octave():
    from musiclm_jax import spectral
    t = np.arange(32000) / 16000
    tones = [110.0, 220.0, 880.0, 261.63, 392.0]  # A2, A3, A5, C4, G4
    audio = jnp.asarray(np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in tones]), jnp.float32)
    profile = np.asarray(spectral.pitch_class_profile(audio, 16000, frames=50, samples_per_frame=640))
    assert profile.shape == (5, 50, 12)
    winners = np.argmax(profile[:, 3:-3], axis=-1)
    for row, expected in enumerate([9, 9, 9, 0, 7]):
        assert np.all(winners[row] == expected), (tones[row], np.bincount(winners[row]))
    with pytest.raises(ValueError, match="lowest_midi=37 is not a C"):
        spectral.pitch_class_profile(audio, 16000, 50, 640, lowest_midi=37)
