"""The three stages train on a real token cache: the tokenization job's output (tiny random-init frozen
tokenizers of the gin files' sizes, over the embedded synthetic music) read through the stage tasks by
`python -m musiclm_jax.train` with gin/stages/<stage>_tiny.gin. Each stage's loss must fall well below its start
(ln of the vocabulary) and below the entropy of its targets' unigram distribution in the cache, which only a model
that uses the context can reach."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import write_frozen_tiny_tokenizers
from musiclm_jax import tokenize
from musiclm_jax import train as train_lib
from musiclm_jax.data import token_cache

STEPS = 120


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_training")
    frozen = write_frozen_tiny_tokenizers(str(root / "frozen"), semantic_clusters=64, mulan_codes=32)
    out = root / "tokens"
    tokenize.main(["--gin_file=gin/tokenize/tiny.gin", f"--gin.OUTPUT_DIR='{out}'",
                   f"--gin.CODEC_CHECKPOINT='{frozen['codec']}'", f"--gin.SEMANTIC_CHECKPOINT='{frozen['semantic']}'",
                   f"--gin.MULAN_CHECKPOINT='{frozen['mulan']}'",
                   "--gin.tokenize.tokenize_dataset.max_clips={'train': 48, 'validation': 8, 'test': 8}"])
    return out


def _unigram_entropy(token_dir, name, levels=None):
    """Entropy (nats) of the codes of tokenizer `name` in the train split, per level, averaged over `levels`."""
    manifest = token_cache.read_manifest(str(token_dir))
    spec = manifest["tokenizers"][name]
    rows = []
    for path in token_cache.completed_shards(str(token_dir), "train", manifest["splits"]["train"]["num_shards"]):
        for record in tf.data.TFRecordDataset(path):
            example = tf.train.Example.FromString(record.numpy())
            rows.append(np.array(example.features.feature[name].int64_list.value).reshape(-1, spec["levels"]))
    codes = np.concatenate(rows)
    entropies = []
    for level in (levels if levels is not None else range(spec["levels"])):
        p = np.bincount(codes[:, level], minlength=spec["codebook_size"]) / len(codes)
        entropies.append(-np.sum(p[p > 0] * np.log(p[p > 0])))
    return float(np.mean(entropies))


@pytest.mark.parametrize("stage,levels", [("semantic", None), ("coarse", (0, 1)), ("fine", (2, 3))])
def test_stage_trains_on_the_token_cache(token_dir, tmp_path, stage, levels):
    model_dir = tmp_path / stage
    metrics = train_lib.main([f"--gin_file=gin/stages/{stage}_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
                              f"--gin.TOKEN_DIR='{token_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
                              "--gin.train_lib.train.eval_period=0", "--gin.train_lib.train.tensorboard=False"])
    with open(model_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    first, last = records[0]["loss"], records[-1]["loss"]
    floor = _unigram_entropy(token_dir, "semantic" if stage == "semantic" else "codec", levels)
    print(f"{stage}: loss {first:.3f} -> {last:.3f} (unigram entropy of the targets {floor:.3f} nats)")
    assert records[-1]["step"] == STEPS and metrics["loss"] == pytest.approx(last)
    assert last < 0.6 * first, (first, last)
    assert last < floor - 0.1, (last, floor)


def test_a_model_whose_layout_disagrees_with_the_cache_is_refused(token_dir, tmp_path):
    with pytest.raises(ValueError, match="does not match the token cache"):
        train_lib.main(["--gin_file=gin/stages/coarse_tiny.gin", f"--gin.MODEL_DIR='{tmp_path / 'bad'}'",
                        f"--gin.TOKEN_DIR='{token_dir}'", "--gin.TRAIN_STEPS=50",
                        "--gin.token_layout.TokenLayout.from_tuples.groups="
                        "(('mulan', 12, 32), ('semantic', 1, 128), ('coarse', 2, 480))"])  # same total ids
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")

