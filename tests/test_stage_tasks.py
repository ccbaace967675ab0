"""Stage tasks over a token cache: the exact token layout of each stage (on a hand-made cache), aligned crops
that stay in the real audio, the paper's sizes, and clear errors for caches that lack what a stage needs."""
import json
import os

import numpy as np
import pytest

from musiclm_jax.data import stages, token_cache
from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.data.input_pipeline import SeqioInputPipeline
from musiclm_jax.data.token_cache import encode_example
from musiclm_jax.tasks import tokenized

# A tiny cache: 4 s chunks, MuLan 3 x 5, semantic 7 codes at 2 Hz, codec 4 levels x 11 codes at 4 Hz.
TOKENIZERS = {"mulan": {"frames": 1, "levels": 3, "codebook_size": 5, "frame_rate": 0.25, "sample_rate": 8},
              "semantic": {"frames": 8, "levels": 1, "codebook_size": 7, "frame_rate": 2.0, "sample_rate": 8},
              "codec": {"frames": 16, "levels": 4, "codebook_size": 11, "frame_rate": 4.0, "sample_rate": 8}}


def _write_cache(root, tokenizers=TOKENIZERS, num_samples=32, examples=3):
    rng = np.random.RandomState(0)
    rows = []
    os.makedirs(root / "train", exist_ok=True)
    import tensorflow as tf
    with tf.io.TFRecordWriter(str(root / "train" / "shard-00000-of-00001.tfrecord")) as writer:
        for i in range(examples):
            tokens = {name: rng.randint(0, t["codebook_size"], (t["frames"], t["levels"]))
                      for name, t in tokenizers.items()}
            rows.append(tokens)
            writer.write(encode_example(f"clip{i}#0", f"caption {i}", num_samples, tokens))
    (root / "train" / "shard-00000-of-00001.json").write_text(json.dumps({"examples": examples}))
    token_cache.write_manifest(str(root), {
        "source": "hand-made", "sample_rate": 8, "chunk_seconds": 4.0, "tokenizers": tokenizers,
        "splits": {"train": {"num_shards": 1, "num_clips": examples, "num_examples": examples}}})
    return rows


def _batches(name, n, seed=0):
    spec = stages.stage_spec_from_name(name)
    cfg = DatasetConfig(name, spec.task_feature_lengths, "train", 1, shuffle=False, seed=seed)
    with SeqioInputPipeline(cfg, "prefix_lm") as pipeline:
        return spec, [{k: v[0] for k, v in next(pipeline).items()} for _ in range(n)]


def _split_prefix(batch, input_length):
    sequence = batch["decoder_target_tokens"]
    np.testing.assert_array_equal(batch["decoder_input_tokens"], np.concatenate([[0], sequence[:-1]]))
    np.testing.assert_array_equal(batch["decoder_loss_weights"], np.arange(len(sequence)) >= input_length)
    return sequence[:input_length], sequence[input_length:]


def _row(rows, inputs_mulan):
    """The example whose MuLan codes are `inputs_mulan`."""
    for row in rows:
        if np.array_equal(row["mulan"][0], inputs_mulan):
            return row
    raise AssertionError(f"no example with MuLan codes {inputs_mulan}")


def test_semantic_stage_layout(tmp_path):
    rows = _write_cache(tmp_path)
    spec, batches = _batches(f"semantic_stage:{tmp_path}?seconds=2", 6)
    assert spec.task_feature_lengths == {"inputs": 3, "targets": 4} and spec.layout.vocab_size == 1 + 15 + 7
    starts = set()
    for batch in batches:
        inputs, targets = _split_prefix(batch, 3)
        mulan = inputs - np.array([1, 6, 11])           # level l of MuLan: ids 1 + 5 l + code
        assert np.all((0 <= mulan) & (mulan < 5))
        semantic = _row(rows, mulan)["semantic"][:, 0]
        start = [s for s in range(5) if np.array_equal(targets - 16, semantic[s:s + 4])]
        assert start, "targets are not a window of the semantic tokens + 16"
        starts.add(start[0])
    assert len(starts) > 1  # random crops


MELODY = {"frames": 4, "levels": 1, "codebook_size": 13, "frame_rate": 1.0, "sample_rate": 8}


def test_semantic_stage_with_melody_layout(tmp_path):
    rows = _write_cache(tmp_path, dict(TOKENIZERS, melody=MELODY))
    spec, batches = _batches(f"semantic_stage:{tmp_path}?seconds=2&melody=1", 8)
    # inputs: 3 MuLan + the melody (1 Hz) of each of the 4 semantic frames (2 Hz), i.e. each melody token twice;
    # layout mulan (1..15), melody (16..28), semantic (29..35).
    assert spec.task_feature_lengths == {"inputs": 7, "targets": 4} and spec.melody
    assert [spec.layout.offset(g) for g in ("mulan", "melody", "semantic")] == [1, 16, 29]
    starts = set()
    for batch in batches:
        inputs, targets = _split_prefix(batch, 7)
        row = _row(rows, inputs[:3] - np.array([1, 6, 11]))
        semantic = row["semantic"][:, 0]
        start = [s for s in range(0, 5, 2) if np.array_equal(targets - 29, semantic[s:s + 4])]
        assert start, "targets are not a melody-aligned window of the semantic tokens + 29"
        np.testing.assert_array_equal(inputs[3:] - 16,
                                      np.repeat(row["melody"][start[0] // 2:start[0] // 2 + 2, 0], 2))
        starts.add(start[0])
    assert len(starts) > 1
    _write_cache(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'melody' tokens"):
        stages.stage_spec_from_name(f"semantic_stage:{tmp_path / 'plain'}?melody=1")
    with pytest.raises(ValueError, match="option of the semantic and coarse stages, not the fine"):
        stages.stage_spec_from_name(f"fine_stage:{tmp_path}?melody=1")


def test_coarse_stage_with_melody_layout(tmp_path):
    rows = _write_cache(tmp_path, dict(TOKENIZERS, melody=MELODY))
    spec, batches = _batches(f"coarse_stage:{tmp_path}?seconds=2&coarse_levels=2&melody=1", 8)
    # inputs: 3 MuLan + the melody of each of the 4 semantic frames + the 4 semantic tokens; targets: 2 s x 4 Hz
    # x 2 levels; layout mulan (1..15), melody (16..28), semantic (29..35), coarse (36..57).
    assert spec.task_feature_lengths == {"inputs": 11, "targets": 16} and spec.melody
    assert [spec.layout.offset(g) for g in ("mulan", "melody", "semantic", "coarse")] == [1, 16, 29, 36]
    starts = set()
    for batch in batches:
        inputs, targets = _split_prefix(batch, 11)
        row = _row(rows, inputs[:3] - np.array([1, 6, 11]))
        semantic = row["semantic"][:, 0]
        start = [s for s in range(0, 5, 2) if np.array_equal(inputs[7:] - 29, semantic[s:s + 4])]
        assert start, "the semantic tokens are not a melody-aligned window + 29"
        np.testing.assert_array_equal(inputs[3:7] - 16, np.repeat(row["melody"][start[0] // 2:start[0] // 2 + 2, 0], 2))
        expected = (row["codec"][2 * start[0]:2 * start[0] + 8, :2] + np.array([36, 47])).reshape(-1)
        np.testing.assert_array_equal(targets, expected)
        starts.add(start[0])
    assert len(starts) > 1


def test_coarse_stage_layout_and_aligned_crop(tmp_path):
    rows = _write_cache(tmp_path)
    spec, batches = _batches(f"coarse_stage:{tmp_path}?seconds=2&coarse_levels=2", 6)
    # inputs: 3 MuLan + 4 semantic; targets: 2 s x 4 Hz x 2 levels, frame-major with per-level offsets.
    assert spec.task_feature_lengths == {"inputs": 7, "targets": 16}
    assert [spec.layout.offset(g) for g in ("mulan", "semantic", "coarse")] == [1, 16, 23]
    for batch in batches:
        inputs, targets = _split_prefix(batch, 7)
        row = _row(rows, inputs[:3] - np.array([1, 6, 11]))
        semantic = row["semantic"][:, 0]
        start = [s for s in range(5) if np.array_equal(inputs[3:] - 16, semantic[s:s + 4])][0]
        expected = (row["codec"][2 * start:2 * start + 8, :2] + np.array([23, 34])).reshape(-1)
        np.testing.assert_array_equal(targets, expected)  # codec frames 2s.. (4 Hz = 2 x the 2 Hz semantic rate)


def test_fine_stage_layout(tmp_path):
    rows = _write_cache(tmp_path, examples=1)
    spec, batches = _batches(f"fine_stage:{tmp_path}?seconds=1&coarse_levels=2&fine_levels=2", 4)
    assert spec.task_feature_lengths == {"inputs": 8, "targets": 8}
    assert [spec.layout.offset(g) for g in ("coarse", "fine")] == [1, 23] and spec.layout.vocab_size == 45
    codec = rows[0]["codec"]
    for batch in batches:
        inputs, targets = _split_prefix(batch, 8)
        first = [f for f in range(13) if np.array_equal(inputs, (codec[f:f + 4, :2] + [1, 12]).reshape(-1))]
        assert first, "inputs are not codec levels 1-2 of a window, frame-major"
        np.testing.assert_array_equal(targets, (codec[first[0]:first[0] + 4, 2:] + [23, 34]).reshape(-1))


def test_crops_stay_in_the_real_audio(tmp_path):
    rows = _write_cache(tmp_path, num_samples=16, examples=1)  # only the first 2 s of the 4 s chunk are real
    _, batches = _batches(f"semantic_stage:{tmp_path}?seconds=2", 5)
    for batch in batches:
        _, targets = _split_prefix(batch, 3)
        np.testing.assert_array_equal(targets - 16, rows[0]["semantic"][:4, 0])


def test_paper_sizes_give_the_documented_layout(tmp_path):
    paper = {"mulan": {"frames": 1, "levels": 12, "codebook_size": 1024, "frame_rate": 1 / 30, "sample_rate": 24000},
             "semantic": {"frames": 750, "levels": 1, "codebook_size": 1024, "frame_rate": 25.0, "sample_rate": 16000},
             "codec": {"frames": 1500, "levels": 12, "codebook_size": 1024, "frame_rate": 50.0, "sample_rate": 24000}}
    os.makedirs(tmp_path, exist_ok=True)
    token_cache.write_manifest(str(tmp_path), {"sample_rate": 24000, "chunk_seconds": 30.0, "tokenizers": paper,
                                               "splits": {}})
    semantic = stages.stage_spec("semantic", str(tmp_path))
    coarse = stages.stage_spec("coarse", str(tmp_path))
    fine = stages.stage_spec("fine", str(tmp_path))
    assert semantic.task_feature_lengths == {"inputs": 12, "targets": 750}
    assert semantic.layout.offset("semantic") == 12289
    assert coarse.task_feature_lengths == {"inputs": 12 + 250, "targets": 2000}
    assert coarse.layout.offset("coarse") == 13313 and coarse.coarse_levels == 4
    assert fine.task_feature_lengths == {"inputs": 600, "targets": 1200}
    assert (fine.layout.offset("fine"), fine.fine_levels) == (4097, 8)


def test_caches_that_lack_what_a_stage_needs(tmp_path):
    no_mulan = {k: v for k, v in TOKENIZERS.items() if k != "mulan"}
    _write_cache(tmp_path, tokenizers=no_mulan)
    with pytest.raises(ValueError, match="has no 'mulan' tokens.*the semantic stage needs them"):
        stages.stage_spec("semantic", str(tmp_path))
    stages.stage_spec("fine", str(tmp_path))  # the fine stage needs only the codec
    with pytest.raises(ValueError, match="do not fit the codec's 4 levels"):
        stages.stage_spec("fine", str(tmp_path), coarse_levels=3, fine_levels=2)
    with pytest.raises(FileNotFoundError, match="is not a token cache"):
        stages.stage_spec("fine", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="unknown option 'secs'"):
        stages.parse_stage_task_name(f"fine_stage:{tmp_path}?secs=3")


def test_a_planned_cache_gives_layouts_but_no_data(tmp_path):
    """A manifest-only cache (aot --job=token_manifest) states a stage's sizes; reading its data is an error that
    names it."""
    from musiclm_jax import aot
    manifest = aot.write_planned_token_cache(aot.tokenizers_setup("gin/tokenize/aot_paper.gin"), str(tmp_path))
    assert manifest["planned"] and manifest["splits"] == {}
    spec = stages.stage_spec("coarse", str(tmp_path), seconds=10.0)
    assert (spec.input_length, spec.target_length) == (12 + 250, 250 * 2 * 4)  # 10 s: 250 semantic, 500 codec frames
    assert stages.stage_groups(f"fine_stage:{tmp_path}?seconds=3.0") == (("coarse", 4, 1024), ("fine", 8, 1024))
    with pytest.raises(ValueError, match="planned token cache.*python -m musiclm_jax.tokenize"):
        tokenized.register_stage_task(f"fine_stage:{tmp_path}")


def test_stage_input_position_is_restored(tmp_path):
    _write_cache(tmp_path / "cache", examples=3)
    name = f"coarse_stage:{tmp_path / 'cache'}?seconds=2&coarse_levels=2"
    spec = stages.stage_spec_from_name(name)
    cfg = DatasetConfig(name, spec.task_feature_lengths, "train", 2, seed=3)
    with SeqioInputPipeline(cfg, "prefix_lm") as a:
        for _ in range(2):
            next(a)
        a.save_state(str(tmp_path / "position"))
        expected = [next(a)["decoder_target_tokens"] for _ in range(3)]
    with SeqioInputPipeline(cfg, "prefix_lm") as b:
        b.restore_state(str(tmp_path / "position"))
        for want in expected:
            np.testing.assert_array_equal(next(b)["decoder_target_tokens"], want)
