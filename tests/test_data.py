"""Token layout, the prefix-LM feature converter's exact layout, the synthetic task and the input pipeline."""
import math

import numpy as np
import pytest
import tensorflow as tf

from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.data.feature_converters import PrefixLMFeatureConverter
from musiclm_jax.data.input_pipeline import SeqioInputPipeline
from musiclm_jax.tasks import synthetic
from musiclm_jax.token_layout import TokenLayout


def test_token_layout_offsets_and_round_trip():
    layout = TokenLayout.from_tuples((("mulan", 12, 1024), ("semantic", 1, 1024), ("coarse", 4, 1024)))
    assert layout.offset("mulan") == 1 and layout.offset("semantic") == 1 + 12 * 1024
    assert layout.offset("coarse") == 1 + 13 * 1024 and layout.vocab_size == 1 + 17 * 1024
    np.testing.assert_array_equal(layout.level_ranges("coarse")[:, 0], 1 + 13 * 1024 + np.arange(4) * 1024)
    codes = np.random.RandomState(0).randint(0, 1024, (3, 10))
    ids = layout.to_global(codes, "coarse", first_level=2)
    # frame-major levels: token j is level (2 + j) % 4
    np.testing.assert_array_equal(ids[:, 0], codes[:, 0] + layout.offset("coarse") + 2 * 1024)
    np.testing.assert_array_equal(ids[:, 2], codes[:, 2] + layout.offset("coarse"))
    np.testing.assert_array_equal(layout.to_local(ids, "coarse", first_level=2), codes)
    with pytest.raises(ValueError, match="repeated group names"):
        TokenLayout.from_tuples((("a", 1, 2), ("a", 1, 2)))


def test_prefix_lm_feature_converter_exact_layout():
    ds = tf.data.Dataset.from_tensors({"inputs": tf.constant([5, 6, 7], tf.int32),
                                       "targets": tf.constant([20, 21], tf.int32)})
    out = next(iter(PrefixLMFeatureConverter()(ds, {"inputs": 3, "targets": 4})))
    out = {k: v.numpy().tolist() for k, v in out.items()}
    assert out == {
        "decoder_input_tokens": [0, 5, 6, 7, 20, 0, 0],
        "decoder_target_tokens": [5, 6, 7, 20, 21, 0, 0],
        "decoder_loss_weights": [0, 0, 0, 1, 1, 0, 0],
        "decoder_causal_attention": [1, 1, 1, 1, 0, 0, 0],
    }
    with pytest.raises(ValueError, match="does not pack"):
        PrefixLMFeatureConverter(pack=True)


def _pipeline(split="train", batch_size=8, seed=0, shuffle=True, **kwargs):
    cfg = DatasetConfig("synthetic_semantic_tiny", {"inputs": 12, "targets": 64}, split, batch_size, seed=seed,
                        shuffle=shuffle)
    return SeqioInputPipeline(cfg, "prefix_lm", **kwargs)


def test_synthetic_task_follows_its_rule_and_is_deterministic():
    layout = synthetic.SEMANTIC_TINY_LAYOUT
    batches = [next(_pipeline(shuffle=False)) for _ in range(2)]
    np.testing.assert_array_equal(batches[0]["decoder_target_tokens"], batches[1]["decoder_target_tokens"])
    follows, total = 0, 0
    pipe = _pipeline(shuffle=False)
    for _ in range(8):
        seq = next(pipe)["decoder_target_tokens"]
        cond = layout.to_local(seq[:, :12], "mulan")
        targets = seq[:, 12:] - layout.offset("semantic")
        assert cond.min() >= 0 and cond.max() < 32 and targets.min() >= 0 and targets.max() < 64
        step = 1 + cond[:, :1] % 8
        follows += np.sum(targets[:, 1:] == (targets[:, :-1] + step) % 64)
        total += targets[:, 1:].size
    # Each token follows the walk with probability 1 - noise + noise / 64.
    assert abs(follows / total - (0.9 + 0.1 / 64)) < 0.02
    assert synthetic.optimal_cross_entropy(0.1, 64) < 0.75 < math.log(64)
    validation = next(_pipeline("validation"))["decoder_target_tokens"]
    assert not np.array_equal(validation, batches[0]["decoder_target_tokens"])


def test_processes_read_disjoint_shards():
    seen = []
    for index in range(2):
        pipe = _pipeline(batch_size=8, shuffle=False, process_index=index, process_count=2)
        batch = next(pipe)
        assert batch["decoder_target_tokens"].shape == (4, 76)
        seen.append({tuple(row) for row in batch["decoder_target_tokens"]})
    assert not seen[0] & seen[1]


def test_input_position_save_and_restore(tmp_path):
    pipe = _pipeline()
    for _ in range(3):
        next(pipe)
    pipe.save_state(str(tmp_path))
    expected = [next(pipe)["decoder_target_tokens"] for _ in range(3)]
    fresh = _pipeline()
    first = next(fresh)["decoder_target_tokens"]
    fresh.restore_state(str(tmp_path))
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["decoder_target_tokens"], want)
    assert not np.array_equal(first, expected[0])
    with pytest.raises(FileNotFoundError, match="no input position"):
        _pipeline().restore_state(str(tmp_path / "missing"))


def test_unknown_task_and_vocabulary_mismatch_are_errors():
    with pytest.raises(ValueError, match="'no_such_task' is not a registered"):
        SeqioInputPipeline(DatasetConfig("no_such_task", {"inputs": 1, "targets": 1}, "train", 2), "prefix_lm")
    with pytest.raises(ValueError, match="vocabulary size 449 but the model's token layout has 13313"):
        _pipeline().check_vocab_size(synthetic.SEMANTIC_PAPER_LAYOUT.vocab_size)
