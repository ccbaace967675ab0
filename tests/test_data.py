"""Token layout, the prefix-LM feature converter's exact layout, the synthetic task and the input pipeline."""
import math
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.data.feature_converters import PrefixLMFeatureConverter
from musiclm_jax.data.input_pipeline import SeqioInputPipeline, block_shuffle
from musiclm_jax.tasks import synthetic
from musiclm_jax.generation.token_layout import TokenLayout


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


def _pipeline(split="train", batch_size=8, seed=0, shuffle=True, input_sharding="global", **kwargs):
    cfg = DatasetConfig("synthetic_semantic_tiny", {"inputs": 12, "targets": 64}, split, batch_size, seed=seed,
                        shuffle=shuffle, input_sharding=input_sharding)
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


def _rows(batch):
    return [tuple(row) for row in batch["decoder_target_tokens"]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_sharding_splits_the_one_process_batches_into_disjoint_rows(shuffle):
    """input_sharding='global' (default): process i of 2 gets rows [4i, 4i + 4) of each 8-example global batch,
    so process 0's rows then process 1's are exactly the one-process batch, shuffled or not."""
    single = _pipeline(batch_size=8, shuffle=shuffle, process_index=0, process_count=1)
    parts = [_pipeline(batch_size=8, shuffle=shuffle, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        want = _rows(next(single))
        got = [_rows(next(p)) for p in parts]
        assert len(got[0]) == len(got[1]) == 4 and not set(got[0]) & set(got[1])
        assert got[0] + got[1] == want


def test_per_process_sharding_reads_disjoint_shards():
    seen = []
    for index in range(2):
        pipe = _pipeline(batch_size=8, shuffle=False, process_index=index, process_count=2,
                         input_sharding="per_process")
        batch = next(pipe)
        assert batch["decoder_target_tokens"].shape == (4, 76)
        seen.append({tuple(row) for row in batch["decoder_target_tokens"]})
    assert not seen[0] & seen[1]
    with pytest.raises(ValueError, match="input_sharding='sideways'"):
        DatasetConfig("synthetic_semantic_tiny", {"inputs": 12, "targets": 64}, "train", 8,
                      input_sharding="sideways")


def test_global_input_position_moves_between_process_counts(tmp_path):
    """A position saved by one process restores in both processes of two (each takes process 0's file) and one
    saved by two processes restores in one: the batches after it are those of the uninterrupted stream."""
    one = _pipeline(process_index=0, process_count=1)
    next(one)
    one.save_state(str(tmp_path / "one"))
    want = [_rows(next(one)) for _ in range(2)]
    two = [_pipeline(process_index=i, process_count=2) for i in range(2)]
    for pipe in two:
        pipe.restore_state(str(tmp_path / "one"))
    for batch in want:
        assert _rows(next(two[0])) + _rows(next(two[1])) == batch
    for pipe in two:
        pipe.save_state(str(tmp_path / "two"))
    assert sorted(n for n in os.listdir(tmp_path / "two") if n.endswith(".json")) == ["process_0.json",
                                                                                        "process_1.json"]
    back = _pipeline(process_index=0, process_count=1)
    back.restore_state(str(tmp_path / "two"))
    assert _rows(next(back)) == _rows(next(two[0])) + _rows(next(two[1]))


def test_per_process_position_under_another_count_starts_a_logged_new_order(tmp_path, capsys):
    """A 'per_process' position cannot map onto another process count's shards: the run does not crash, it
    starts a new order seeded by (seed, examples read) and says so; the same fallback is deterministic. Another
    sharding or global batch size is refused."""
    pipe = _pipeline(process_index=0, process_count=1, input_sharding="per_process")
    for _ in range(3):
        next(pipe)
    pipe.save_state(str(tmp_path))
    with open(tmp_path / "process_0.json") as f:
        assert json.load(f)["examples"] == 24  # 3 batches of 8
    fresh = [_rows(next(_pipeline(process_index=i, process_count=2, input_sharding="per_process")))
             for i in range(2)]
    moved = []
    for _ in range(2):
        pipes = [_pipeline(process_index=i, process_count=2, input_sharding="per_process") for i in range(2)]
        for p in pipes:
            p.restore_state(str(tmp_path / "."))  # process 1 has no file of its own: it reads process 0's record
        moved.append([_rows(next(p)) for p in pipes])
    assert "not restored" in capsys.readouterr().err
    assert moved[0] == moved[1] and moved[0] != fresh  # deterministic, and not the saved run's order from its start
    assert not set(moved[0][0]) & set(moved[0][1])  # still disjoint shards
    for p in pipes:  # and back: saved by 2 processes, resumed by 1
        p.save_state(str(tmp_path / "two"))
    one = _pipeline(process_index=0, process_count=1, input_sharding="per_process")
    one.restore_state(str(tmp_path / "two"))
    assert "saved by 2 processes" in capsys.readouterr().err and len(_rows(next(one))) == 8
    with pytest.raises(ValueError, match=r"input_sharding 'per_process' \(now 'global'\)"):
        _pipeline(process_index=0, process_count=1).restore_state(str(tmp_path))
    with pytest.raises(ValueError, match=r"batch_size 8 \(now 16\)"):
        _pipeline(batch_size=16, process_index=0, process_count=1,
                  input_sharding="per_process").restore_state(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no input position for process 0"):
        _pipeline(process_index=0, process_count=1, input_sharding="per_process").restore_state(
            str(tmp_path / "missing"))


def test_block_shuffle_permutes_blocks_and_resumes_mid_block_without_storing_examples(tmp_path):
    """Each block of 64 is a permutation of its 64 inputs, drawn anew per block and per seed; a symbolic
    checkpoint taken inside a block holds no examples (the block's 64 x 16 KB would be 1 MB) and resumes exactly."""
    ds = tf.data.Dataset.range(1000).map(lambda i: {"x": tf.fill([4000], tf.cast(i, tf.float32)), "i": i})
    options = tf.data.Options()
    options.experimental_symbolic_checkpoint = True
    shuffled = block_shuffle(ds, 64, seed=3).with_options(options)
    order = [int(e["i"]) for e in shuffled.take(256).as_numpy_iterator()]
    for b in range(4):
        block = order[64 * b:64 * (b + 1)]
        assert sorted(block) == list(range(64 * b, 64 * (b + 1))) and block != sorted(block)
    offsets = [[i - 64 * b for i in order[64 * b:64 * (b + 1)]] for b in range(4)]
    assert len({tuple(o) for o in offsets}) == 4  # each block its own permutation
    assert order == [int(e["i"]) for e in block_shuffle(ds, 64, seed=3).take(256).as_numpy_iterator()]
    assert order != [int(e["i"]) for e in block_shuffle(ds, 64, seed=4).take(256).as_numpy_iterator()]
    iterator = iter(shuffled)
    for _ in range(100):
        next(iterator)
    tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "position"))
    want = [int(next(iterator)["i"]) for _ in range(60)]
    size = sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path))
    assert size < 16_000, size
    restored = iter(shuffled)
    tf.train.Checkpoint(iterator=restored).read(str(tmp_path / "position")).assert_consumed()
    assert [int(next(restored)["i"]) for _ in range(60)] == want == order[100:160]
    with pytest.raises(ValueError, match="block 0 must be >= 1"):
        block_shuffle(ds, 0, seed=3)


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
