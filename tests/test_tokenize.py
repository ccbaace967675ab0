"""The tokenization job on tiny random-init frozen models: its cache read back through the stage tasks equals the
tokenizers applied directly, counts of skipped inputs, and a killed job resumed without redoing finished shards."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from conftest import REPO_DIR, subprocess_env
from helpers import write_frozen_tiny_tokenizers
from musiclm_jax import tokenize
from musiclm_jax.generation import melody
from musiclm_jax.codec.inference import Codec
from musiclm_jax.data import audio_io, stages, synthetic_music, token_cache
from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.data.input_pipeline import SeqioInputPipeline
from musiclm_jax.mulan.inference import MuLan
from musiclm_jax.semantic.inference import SemanticTokenizer

RATE = 24000


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return write_frozen_tiny_tokenizers(str(tmp_path_factory.mktemp("frozen_tokenizers")))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight captioned 5 s clips (6 train, 2 validation), a 0.5 s clip and a corrupt file."""
    root = tmp_path_factory.mktemp("tokenize_clips")
    lines = []
    for i in range(8):
        clip = synthetic_music.generate_clip(i, seed=11, seconds=5.0, sample_rate=RATE)
        soundfile.write(root / f"clip{i}.wav", clip["audio"], RATE, subtype="FLOAT")
        lines.append({"audio_path": f"clip{i}.wav", "caption": clip["caption"],
                      "split": "validation" if i >= 6 else "train"})
    soundfile.write(root / "short.wav", 0.3 * np.sin(np.arange(RATE // 2) / 10.0), RATE)
    (root / "broken.wav").write_bytes(b"RIFF....WAVE nonsense")
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(root)


def _args(frozen, clips, output, *extra):
    return ["--gin_file=gin/tokenize/tiny.gin", f"--gin.CODEC_CHECKPOINT='{frozen['codec']}'",
            f"--gin.SEMANTIC_CHECKPOINT='{frozen['semantic']}'", f"--gin.MULAN_CHECKPOINT='{frozen['mulan']}'",
            f"--gin.OUTPUT_DIR='{output}'",
            f"--gin.AUDIO_DIR='{clips}'", "--gin.tokenize.tokenize_dataset.chunk_seconds=2.0",
            "--gin.tokenize.tokenize_dataset.clips_per_shard=2", "--gin.tokenize.tokenize_dataset.batch_size=3",
            "--gin.tokenize.tokenize_dataset.splits=('train', 'validation')", *extra]


def _read(path):
    import tensorflow as tf
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def test_cache_matches_the_tokenizers_and_counts_skips(frozen, clips, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICLM_TFDS_DIR", str(tmp_path / "tfds"))
    out = tmp_path / "tokens"
    # 'test' is asked for, but the folder has no test rows and too few files to carve them: it is left out.
    tokenize.main(_args(frozen, clips, out, "--gin.tokenize.tokenize_dataset.splits=('train', 'validation', 'test')"))
    manifest = token_cache.read_manifest(str(out))
    assert sorted(manifest["splits"]) == ["train", "validation"]
    train = manifest["splits"]["train"]
    # 7 train clips (6 x 5 s, 1 x 0.5 s): 2 chunks of 2 s from each long one, a 1 s tail dropped from each.
    assert (train["num_clips"], train["num_shards"], train["num_examples"]) == (7, 4, 12)
    assert train["skipped"] == {"too_short": 1} and train["dropped_tail_seconds"] == pytest.approx(6.0)
    assert manifest["splits"]["validation"]["num_examples"] == 4 and manifest["complete"]
    assert manifest["source_bad_input"]["skipped"] == {"undecodable": 1}
    assert manifest["tokenizers"]["codec"]["frames"] == 100 and manifest["tokenizers"]["semantic"]["frames"] == 50
    assert (manifest["tokenizers"]["mulan"]["frames"], manifest["tokenizers"]["mulan"]["levels"]) == (1, 12)
    assert (manifest["tokenizers"]["melody"]["frames"], manifest["tokenizers"]["melody"]["codebook_size"]) == (10, 13)
    # The planned manifest of the same tokenizers (`aot --job=token_manifest`, from their gin files without weights)
    # states what the job wrote: rates, levels, codebook sizes and frames per chunk.
    from musiclm_jax import aot, tokenize_forward
    planned = aot.planned_token_manifest(tokenize_forward.aot_setup(
        codec_gin="gin/models/codec_tiny.gin", semantic_gin="gin/models/w2v_bert_tiny.gin",
        semantic_fit_gin="gin/semantic/kmeans_tiny.gin", mulan_gin="gin/models/mulan_tiny.gin",
        mulan_rvq_levels=12, mulan_rvq_codebook_size=16, chunk_seconds=2.0, melody_rate=5.0))
    assert sorted(planned["tokenizers"]) == sorted(manifest["tokenizers"])
    for name, spec in manifest["tokenizers"].items():
        want = dict(spec, checkpoint=None)
        if name == "semantic":
            want["codebook_size"] = 64  # the fixture fits 16 clusters; gin/semantic/kmeans_tiny.gin states 64
        assert planned["tokenizers"][name] == want, name

    codec, tokenizer = Codec.from_checkpoint(frozen["codec"]), SemanticTokenizer.load(frozen["semantic"])
    examples = [e for p in token_cache.completed_shards(str(out), "validation", 1) for e in _read(p)]
    by_id = {e.features.feature["id"].bytes_list.value[0].decode(): e for e in examples}
    assert sorted(by_id) == ["clip6.wav#0", "clip6.wav#1", "clip7.wav#0", "clip7.wav#1"]
    audio, _ = soundfile.read(os.path.join(clips, "clip7.wav"), dtype="float32")
    chunk = np.round(audio[2 * RATE:4 * RATE] * 32767) / 32768.0  # the second chunk, as the dataset stores it
    example = by_id["clip7.wav#1"].features.feature
    codes = np.array(example["codec"].int64_list.value).reshape(100, 4)
    np.testing.assert_array_equal(codes, codec.encode(chunk.astype(np.float32)))
    semantic = np.array(example["semantic"].int64_list.value)
    np.testing.assert_array_equal(semantic, tokenizer.tokenize(audio_io.resample(chunk[None], RATE, 16000))[0])
    assert example["text"].bytes_list.value[0].decode() == synthetic_music.generate_clip(7, seed=11)["caption"]
    np.testing.assert_array_equal(np.array(example["melody"].int64_list.value),
                                  melody.melody_tokens(chunk.astype(np.float32), RATE)[0])
    mulan = MuLan.from_checkpoint(frozen["mulan"])
    mulan_tokens = np.array(example["mulan"].int64_list.value)
    np.testing.assert_array_equal(mulan_tokens, mulan.tokens_from_audio(
        audio_io.resample(chunk[None], RATE, 16000))[0])

    # Read back through the semantic and coarse stages: MuLan, semantic and codec tokens of the cache, laid out.
    def feature(e, name):
        return np.array(e.features.feature[name].int64_list.value)

    name = f"semantic_stage:{out}?seconds=1&melody=1"  # MuLan, then the melody token of each of the 25 frames
    spec = stages.stage_spec_from_name(name)
    cfg = DatasetConfig(name, spec.task_feature_lengths, "validation", 4, shuffle=False, seed=0)
    with SeqioInputPipeline(cfg, "prefix_lm") as pipeline:
        batch = next(pipeline)["decoder_target_tokens"]
    assert spec.task_feature_lengths == {"inputs": 37, "targets": 25}
    for row in batch:
        crop = row[37:] - spec.layout.offset("semantic")
        tune = row[12:37] - spec.layout.offset("melody")
        assert any(np.array_equal(crop, feature(e, "semantic")[s:s + 25])
                   and np.array_equal(tune, np.repeat(feature(e, "melody")[s // 5:s // 5 + 5], 5))
                   for e in examples for s in range(0, 26, 5))

    for stage in ("semantic", "coarse"):
        name = f"{stage}_stage:{out}?seconds=1"
        spec = stages.stage_spec_from_name(name)
        cfg = DatasetConfig(name, spec.task_feature_lengths, "validation", 4, shuffle=False, seed=0)
        with SeqioInputPipeline(cfg, "prefix_lm") as pipeline:
            batch = next(pipeline)["decoder_target_tokens"]
        assert spec.task_feature_lengths == ({"inputs": 12, "targets": 25} if stage == "semantic" else
                                             {"inputs": 37, "targets": 100})
        for row in batch:
            codes = row[:12] - spec.layout.level_ranges("mulan")[:, 0]
            crop = (row[12:37] if stage == "coarse" else row[12:]) - spec.layout.offset("semantic")
            matches = []  # (example, start) whose MuLan tokens and semantic crop this row holds
            for e in examples:
                if np.array_equal(feature(e, "mulan"), codes):
                    matches += [(e, s) for s in range(26) if np.array_equal(crop, feature(e, "semantic")[s:s + 25])]
            assert matches, f"{stage}: the row is not an example's MuLan tokens and a crop of its semantic tokens"
            if stage == "coarse":  # codec levels 1-2 of the same 1 s (codec frames 2s .. 2s + 49), frame-major
                offsets = spec.layout.level_ranges("coarse")[:, 0]
                assert any(np.array_equal(row[37:], (feature(e, "codec").reshape(100, 4)[2 * s:2 * s + 50, :2]
                                                     + offsets).reshape(-1)) for e, s in matches)

    # Read back through the fine stage (levels 1-2 -> 3-4 of the 4-level codec): the codes of the cache.
    name = f"fine_stage:{out}?seconds=1"
    spec = stages.stage_spec_from_name(name)
    cfg = DatasetConfig(name, spec.task_feature_lengths, "validation", 4, shuffle=False, seed=0)
    with SeqioInputPipeline(cfg, "prefix_lm") as pipeline:
        batch = next(pipeline)
    assert batch["decoder_target_tokens"].shape == (4, 200)
    targets = batch["decoder_target_tokens"][:, 100:].reshape(4, 50, 2) - spec.layout.level_ranges("fine")[:, 0]
    assert targets.min() >= 0 and targets.max() < 512
    all_codes = [np.array(e.features.feature["codec"].int64_list.value).reshape(100, 4) for e in examples]
    for row in targets:
        assert any(np.array_equal(row, c[f:f + 50, 2:]) for c in all_codes for f in range(51))

    with pytest.raises(ValueError, match="other settings.*chunk_seconds"):
        tokenize.main(_args(frozen, clips, out, "--gin.tokenize.tokenize_dataset.chunk_seconds=1.0"))


_KILL_AT_THIRD_SHARD = """
import os, signal, sys
real_replace, renamed = os.replace, []
def replace(src, dst):
    real_replace(src, dst)
    if dst.endswith(".tfrecord"):
        renamed.append(dst)
        if len(renamed) == 3:  # the third shard is written but not yet marked done
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from musiclm_jax import tokenize
tokenize.main(sys.argv[1:])
"""


def test_killed_job_resumes_without_redoing_finished_shards(frozen, clips, tmp_path):
    env = subprocess_env()
    env["MUSICLM_TFDS_DIR"] = str(tmp_path / "tfds")
    out = tmp_path / "tokens"
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_THIRD_SHARD, *_args(frozen, clips, out)], cwd=REPO_DIR,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    done = sorted(p for p in os.listdir(out / "train") if p.endswith(".json"))
    assert done == ["shard-00000-of-00004.json", "shard-00001-of-00004.json"]
    stamps = {p: os.stat(out / "train" / p).st_mtime_ns for p in os.listdir(out / "train")}
    proc = subprocess.run([sys.executable, "-m", "musiclm_jax.tokenize", *_args(frozen, clips, out)], cwd=REPO_DIR,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("already done, skipping") == 2
    for name in ("shard-00000-of-00004.tfrecord", "shard-00001-of-00004.tfrecord", "shard-00000-of-00004.json"):
        assert os.stat(out / "train" / name).st_mtime_ns == stamps[name]  # not rewritten
    assert os.stat(out / "train" / "shard-00002-of-00004.tfrecord").st_mtime_ns != stamps[
        "shard-00002-of-00004.tfrecord"]  # the unmarked shard was redone
    manifest = token_cache.read_manifest(str(out))
    assert manifest["complete"] and manifest["splits"]["train"]["num_examples"] == 12


def test_one_function_forward_equals_the_jobs_tokenizers(frozen):
    """tokenize_forward (what `aot --job=tokenize` compiles and benchmarks/tokenize.py times) gives the job's
    tokens: codec and semantic tokens equal, MuLan's embeddings within 1e-5 and its codes equal except at the
    near ties the job itself counts (the random tiny MuLan's deeper levels are ties)."""
    import jax

    from musiclm_jax import flops, tokenize_forward
    codec, tokenizer = Codec.from_checkpoint(frozen["codec"]), SemanticTokenizer.load(frozen["semantic"])
    mulan = MuLan.from_checkpoint(frozen["mulan"])
    forward, variables = tokenize_forward.from_tokenizers(codec, tokenizer, mulan)
    assert forward.sample_rates == [16000, 24000]
    # 6 s chunks: three MuLan windows of 4 s (at 0, 1 and 2 s) are averaged.
    audio = np.stack([synthetic_music.generate_clip(i, seed=5, seconds=6.0, sample_rate=RATE)["audio"]
                      for i in range(3)]).astype(np.float32)
    inputs = {rate: audio_io.resample(audio, RATE, rate).astype(np.float32) for rate in forward.sample_rates}
    out = jax.jit(forward)(variables, inputs)
    batcher = tokenize.DeviceBatcher()
    job = {s.name: batcher(s, audio, RATE) for s in (tokenize.codec_token_source(codec),
                                                     tokenize.semantic_token_source(tokenizer),
                                                     tokenize.mulan_token_source(mulan, 6.0))}
    np.testing.assert_array_equal(np.asarray(out["codec"]), job["codec"][0])
    np.testing.assert_array_equal(np.asarray(out["semantic"]), job["semantic"][0][..., 0])
    mulan_codes, near = job["mulan"][0][:, 0], job["mulan"][1][:, 0]
    assert (~near).sum() >= 6  # the first levels are decided
    np.testing.assert_array_equal(np.asarray(out["mulan"])[~near], mulan_codes[~near])
    embeddings = jax.jit(forward._mulan_embeddings)(variables["mulan"]["params"], inputs[16000])
    np.testing.assert_allclose(np.asarray(embeddings), mulan.embed_audio(inputs[16000]), atol=1e-5)

    # The FLOP count adds up by tokenizer and is the codec's alone without the others.
    import dataclasses
    total = flops.matmul_flops(forward, variables, inputs)
    parts = [flops.matmul_flops(dataclasses.replace(forward, **kw), variables, inputs) for kw in
             ({"features": None, "mulan_model": None}, {"mulan_model": None}, {"features": None})]
    assert 0 < parts[0] < parts[1] < total and parts[1] + parts[2] - parts[0] == total
