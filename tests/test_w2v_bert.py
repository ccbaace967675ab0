"""w2v-BERT: span masking statistics, negatives, the contrastive loss by hand, 25 Hz frames, and 200 steps of
training through the CLI lowering both losses."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_on_one_device
from musiclm_jax import gin_utils
from musiclm_jax import train  # noqa: F401  (the run files bind train_lib.train)
from musiclm_jax.networks.w2v_bert import W2VBertConfig
from musiclm_jax.w2v_bert_model import contrastive_loss, sample_negatives, span_mask

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
