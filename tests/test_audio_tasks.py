"""Raw-audio tasks and the TFDS builders behind them: the synthetic music, audio folders and MusicCaps, built
from small folders made here (bad files included); shapes, rates, crops, splits, counts and disjoint shards."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio
import soundfile

from musiclm_jax.data import tfds_builders
from musiclm_jax.data.bad_input import BadInputError
from musiclm_jax.data.captioned_audio import AudioChecks
from musiclm_jax.data.dataset_config import DatasetConfig, RawAudioSource, raw_audio_source, raw_audio_task_name
from musiclm_jax.data.input_pipeline import SeqioInputPipeline, missing_split
from musiclm_jax.tasks import audio as audio_tasks
from conftest import REPO_DIR, subprocess_env
from test_captioned_audio import _bad_folder, _musiccaps

RATE = 16000


@pytest.fixture(autouse=True)
def _tfds_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICLM_TFDS_DIR", str(tmp_path / "tfds"))


def _pipeline(name, split="train", batch_size=4, length=8000, seed=0, shuffle=True):
    cfg = DatasetConfig(name, {"audio": length}, split, batch_size, seed=seed, shuffle=shuffle)
    return SeqioInputPipeline(cfg, "audio")


def test_a_raw_audio_source_is_typed_and_its_task_name_round_trips():
    source = raw_audio_source(audio_dir="/data/clips", bad_input="error", require_captions=True,
                              validation_fraction=0.2)
    assert source.sample_rate is None and source.kind == "audio_folder"
    name = source.at_rate(RATE).task_name
    assert name == "audio_folder_16000hz:/data/clips?bad_input=error&require_captions=true&validation_fraction=0.2"
    parsed = RawAudioSource.from_task_name(name)
    assert parsed == source.at_rate(RATE) and parsed.options["validation_fraction"] == 0.2
    assert parsed.options["require_captions"] is True and isinstance(parsed.sample_rate, int)
    assert RawAudioSource.from_task_name("musiccaps_24000hz:/mc?clips_dir=/clips").options == {"clips_dir": "/clips"}
    assert raw_audio_task_name(RATE) == "synthetic_music_16000hz" == raw_audio_source().at_rate(RATE).task_name
    with pytest.raises(ValueError, match="at 16000 Hz, not 24000 Hz"):
        parsed.at_rate(24000)
    with pytest.raises(ValueError, match="has no sample rate yet"):
        source.task_name
    with pytest.raises(ValueError, match="synthetic_music: takes no path"):
        RawAudioSource.from_task_name("synthetic_music_16000hz:/x")
    with pytest.raises(ValueError, match="needs a source directory"):
        RawAudioSource("audio_folder", RATE)
    with pytest.raises(ValueError, match="not a raw-audio task name"):
        RawAudioSource.from_task_name("audio_folder_16khz:/x")
    with pytest.raises(ValueError, match="positive integer"):
        RawAudioSource("synthetic_music", 16000.5)


def test_synthetic_music_crops_normalises_and_resumes(tmp_path):
    name = raw_audio_task_name(RATE)
    assert name == "synthetic_music_16000hz"
    with _pipeline(name) as a, _pipeline(name) as b:
        first = next(a)["audio"]
        np.testing.assert_array_equal(first, next(b)["audio"])  # deterministic for a seed
        assert first.shape == (4, 8000) and first.dtype == np.float32
        rms = np.sqrt(np.mean(first ** 2, axis=1))
        assert np.all(np.abs(first) <= 1.0) and np.all(rms > 0.03) and np.all(rms <= 0.1 + 1e-4)  # -20 dBFS
        a.save_state(str(tmp_path))
        expected = [next(a)["audio"] for _ in range(2)]
    with _pipeline(name) as c:
        c.restore_state(str(tmp_path))
        for want in expected:
            np.testing.assert_array_equal(next(c)["audio"], want)
    example = next(iter(audio_tasks.register_raw_audio_task(name).get_dataset(
        {"audio": 8000}, "validation", shuffle=False, seed=0)))
    assert example["text"].numpy().decode().strip() and example["id"].numpy().decode().startswith("synthetic-")


def test_a_synthetic_clip_gives_as_many_crops_as_fit_each_drawn_at_its_own_offset():
    """SYNTHETIC_CROPS_PER_CLIP: a 4 s clip (64,000 samples at 16 kHz) gives 4 crops of 0.5 s, 3 of 1.25 s and 1
    of 4 s, consecutive before shuffling, each a scaled copy of the clip at its own offset."""
    from musiclm_jax.data import synthetic_music
    name = raw_audio_task_name(RATE)
    task = audio_tasks.register_raw_audio_task(name)
    clip = synthetic_music.generate_clip(0, seed=1, seconds=audio_tasks.SYNTHETIC_CLIP_SECONDS,
                                         sample_rate=RATE)["audio"]
    for length, count in ((8000, 4), (20000, 3), (64000, 1)):
        examples = list(task.get_dataset({"audio": length}, "validation", shuffle=False, seed=0).take(count + 1))
        ids = [ex["id"].numpy().decode() for ex in examples]
        assert ids == ["synthetic-1-0"] * count + ["synthetic-1-1"], (length, ids)
        offsets = []
        for ex in examples[:count]:
            crop = ex["audio"].numpy()
            assert crop.shape == (length,)
            scores = np.correlate(clip, crop, mode="valid")
            start = int(np.argmax(np.abs(scores)))
            window = clip[start:start + length]
            gain = np.dot(crop, window) / np.dot(window, window)
            np.testing.assert_allclose(crop, gain * window, atol=1e-4)
            offsets.append(start)
        assert len(set(offsets)) == count, offsets  # not one crop repeated


def _find_crop(crop, clip):
    """The offset at which `crop` is a scaled copy of clip[offset:offset + len(crop)] (None if nowhere)."""
    for start in range(len(clip) - len(crop) + 1):
        window = clip[start:start + len(crop)]
        gain = np.dot(crop, window) / max(np.dot(window, window), 1e-12)
        if np.max(np.abs(crop - gain * window)) < 1e-4:
            return start
    return None


def test_audio_folder_builder_counts_bad_files_and_its_task_crops(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    expected = _bad_folder(folder)
    builder = tfds_builders.audio_folder_builder(str(folder), AudioChecks(RATE))
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    assert splits == {"train": 2, "validation": 1, "test": 1}
    report = builder.info.metadata["bad_input"]
    assert report["skipped"] == {reason: 1 for reason in expected}
    assert report["notes"]["downmixed"] == 1 and report["notes"]["resampled"] == 1
    test = next(iter(builder.as_dataset(split="test").as_numpy_iterator()))
    assert (test["id"], test["caption"]) == (b"good.wav", b"white noise")
    np.testing.assert_allclose(test["audio"] / 32768.0, soundfile.read(folder / "good.wav")[0], atol=1e-4)

    name = raw_audio_task_name(RATE, str(folder))
    with _pipeline(name, batch_size=2) as train:
        assert next(train)["audio"].shape == (2, 8000)
    stored = test["audio"].astype(np.float32) / 32768.0
    with _pipeline(name, split="test", batch_size=1, length=4000, shuffle=False) as crops:
        starts = [_find_crop(next(crops)["audio"][0], stored) for _ in range(4)]
    assert None not in starts and len(set(starts)) > 1  # contiguous crops, new ones each epoch


def test_prepared_folders_are_reused_and_rebuilt_when_they_change(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    soundfile.write(folder / "a.wav", np.random.RandomState(0).randn(RATE) * 0.1, RATE)
    first = tfds_builders.audio_folder_builder(str(folder), AudioChecks(RATE))
    info = os.path.join(first.data_dir, "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    again = tfds_builders.audio_folder_builder(str(folder), AudioChecks(RATE))
    assert again.data_dir == first.data_dir and os.stat(info).st_mtime_ns == stamp
    soundfile.write(folder / "b.wav", np.random.RandomState(1).randn(RATE) * 0.1, RATE)
    changed = tfds_builders.audio_folder_builder(str(folder), AudioChecks(RATE))
    assert changed.data_dir != first.data_dir and changed.info.splits["train"].num_examples == 2
    strict = tfds_builders.audio_folder_builder(str(folder), AudioChecks(RATE, bad_input="error"))
    assert strict.data_dir != changed.data_dir  # the checks are part of the config


def test_error_policy_from_the_task_name(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    soundfile.write(folder / "ok.wav", np.random.RandomState(0).randn(RATE) * 0.1, RATE)
    (folder / "broken.flac").write_bytes(b"fLaC but not really")
    name = raw_audio_task_name(RATE, str(folder), bad_input="error")
    assert name.endswith("?bad_input=error")
    with pytest.raises(BadInputError, match=r"broken.flac: cannot decode audio.*\[undecodable\]"):
        audio_tasks.register_raw_audio_task(name)
    with pytest.raises(ValueError, match="unknown option 'bad_inptu'"):
        audio_tasks.register_raw_audio_task(f"audio_folder_{RATE}hz:{folder}?bad_inptu=error")
    with pytest.raises(ValueError, match="not both"):
        raw_audio_task_name(RATE, str(folder), musiccaps_dir=str(folder))


def test_musiccaps_task_splits_and_missing_clips(tmp_path):
    csv_path, clips = _musiccaps(tmp_path)
    name = f"musiccaps_{RATE}hz:{tmp_path}?clips_dir={clips}"
    task = audio_tasks.register_raw_audio_task(name)
    builder = task.source.builder
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 1, "test": 1}
    assert builder.info.metadata["bad_input"]["skipped"] == {"bad_csv_row": 2, "missing_clip": 1}
    record = next(iter(builder.as_dataset(split="train").as_numpy_iterator()))
    assert record["id"] == b"aaa" and list(record["aspects"]) == [b"piano", b"calm"]
    assert len(record["audio"]) == 10 * RATE
    example = next(iter(task.get_dataset({"audio": 16000}, "test", shuffle=False, seed=0)))
    assert example["audio"].shape == (16000,) and example["text"].numpy() == b"Loud drums."


def test_processes_read_disjoint_parts_of_a_prepared_split(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(7):
        soundfile.write(folder / f"c{i}.wav", np.random.RandomState(i).randn(800) * 0.1, RATE)
    (folder / "captions.jsonl").write_text("".join(json.dumps({"audio_path": f"c{i}.wav", "caption": f"clip {i}"})
                                                   + "\n" for i in range(7)))
    source = tfds_builders.PreparedTfdsSource(tfds_builders.audio_folder_builder(str(folder), AudioChecks(RATE)))
    parts = [[ex["id"].numpy() for ex in source.get_dataset("train", shuffle=False,
                                                             shard_info=seqio.ShardInfo(i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(f"c{i}.wav".encode() for i in range(7))
    assert all(parts) and len(set(sum(parts, []))) == 7
    with pytest.raises(ValueError, match="fewer than the 8 processes"):
        source.get_dataset("train", shard_info=seqio.ShardInfo(0, 8))


def _folder_without_splits(root, n):
    """n usable files as a user's folder has them (16 kHz and 44.1 kHz, mono and stereo, wav and flac, in
    subfolders; captions.jsonl rows without a 'split' field) plus a corrupt file."""
    root.mkdir()
    lines = []
    for i in range(n):
        rate, channels = (44100, 2) if i % 3 == 0 else (RATE, 1)
        name = f"artist_{i % 4}/take_{i:02d}." + ("flac" if i % 2 else "wav")
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        shape = (int(1.2 * rate), channels) if channels > 1 else (int(1.2 * rate),)
        soundfile.write(root / name, 0.2 * np.random.RandomState(i).randn(*shape), rate)
        lines.append(json.dumps({"audio_path": name, "caption": f"take {i}"}))
    (root / "artist_0" / "broken.wav").write_bytes(b"RIFF....WAVE not audio")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_folder_without_splits_gets_a_held_out_carve(tmp_path):
    folder = _folder_without_splits(tmp_path / "catalogue", 16)
    name = raw_audio_task_name(RATE, str(folder), validation_fraction=0.2, test_fraction=0.1)
    assert name.endswith("?validation_fraction=0.2&test_fraction=0.1")
    builder = audio_tasks.register_raw_audio_task(name).source.builder
    splits = {s: i.num_examples for s, i in builder.info.splits.items()}
    held_out = builder.info.metadata["held_out"]
    assert held_out["carve"] == {"validation_fraction": 0.2, "test_fraction": 0.1, "min_files": 10}
    assert sum(splits.values()) == 16 and splits["validation"] >= 1 and splits["test"] >= 1
    # Records are counted before decoding: the corrupt file is one, then skipped wherever it fell.
    assert sum(held_out["records"].values()) == 17 and sum(
        held_out["records"][s] - splits[s] for s in splits) == 1
    notes = builder.info.metadata["bad_input"]["notes"]
    assert (notes["carved_validation"], notes["carved_test"]) == (splits["validation"], splits["test"])
    assert builder.info.metadata["bad_input"]["skipped"] == {"undecodable": 1}
    assert notes["downmixed"] == 6 and notes["resampled"] == 6
    # The evaluation input that used to fail with "has no split 'validation'".
    cfg = DatasetConfig(name, {"audio": 8000}, "validation", 2, seed=0, shuffle=False)
    assert missing_split(cfg) is None
    with SeqioInputPipeline(cfg, "audio") as pipeline:
        assert next(pipeline)["audio"].shape == (2, 8000)
    # The same files seen by the jobs that scan folders directly (codec evaluation, k-means, RVQ fits).
    from musiclm_jax.data.captioned_audio import HeldOutCarve, scan_audio_folder
    scanned = scan_audio_folder(str(folder), RATE, held_out=HeldOutCarve(0.2, 0.1))
    assert {s: len(p) for s, p in scanned.items()} == splits
    test_ids = {ex["id"].decode() for ex in builder.as_dataset(split="test").as_numpy_iterator()}
    assert {os.path.relpath(p, folder) for p in scanned["test"]} == test_ids

    few = _folder_without_splits(tmp_path / "three", 3)
    few_name = raw_audio_task_name(RATE, str(few))
    assert missing_split(DatasetConfig(few_name, {"audio": 8000}, "validation", 2)) == (
        f"{few_name!r} has no 'validation' split (splits: ['train'])")
    assert audio_tasks.register_raw_audio_task(few_name).source.builder.info.metadata["bad_input"]["notes"][
        "no_held_out"] == 1


@pytest.mark.parametrize("files, evaluated", [(12, True), (3, False)])
def test_codec_training_on_a_folder_with_only_train_rows(tmp_path, files, evaluated):
    """`python -m musiclm_jax.train` on a user's folder without split fields: evaluation runs on the carved
    'validation' split, or, with 3 files, the run trains without evaluation and says so."""
    folder = _folder_without_splits(tmp_path / "clips", files)
    model_dir = tmp_path / "codec"
    command = [sys.executable, "-m", "musiclm_jax.train", "--gin_file=gin/codec/tiny_reconstruction.gin",
               f"--gin.MODEL_DIR='{model_dir}'", f"--gin.AUDIO_DIR='{folder}'", "--gin.TRAIN_STEPS=2",
               "--gin.BATCH_SIZE=8", "--gin.EVAL_BATCH_SIZE=8", "--gin.SEGMENT_SAMPLES=4800",
               "--gin.train_lib.train.eval_period=2", "--gin.train_lib.train.eval_batches=1",
               "--gin.train_lib.train.tensorboard=False", "--gin.codec_model.SoundStreamModel.mel_scales=(256, 1024)"]
    proc = subprocess.run(command, cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(model_dir / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["step"] == 2
    assert ("eval/mel_distance" in last) == evaluated
    if not evaluated:
        assert "has no 'validation' split (splits: ['train']), so this run trains without evaluation" in proc.stdout
    assert "skipping" in proc.stderr and "broken.wav" in proc.stderr  # the bad file is named and counted
