"""Raw-audio tasks: the embedded synthetic music and a user's audio folder (bad files counted and skipped)."""
import json

import numpy as np
import pytest
import soundfile

from musiclm_jax.data.dataset_config import DatasetConfig, raw_audio_task_name
from musiclm_jax.data.input_pipeline import SeqioInputPipeline
from musiclm_jax.tasks import audio as audio_tasks

RATE = 16000


def _pipeline(name, split="train", batch_size=4, length=8000, seed=0):
    cfg = DatasetConfig(name, {"audio": length}, split, batch_size, seed=seed)
    return SeqioInputPipeline(cfg, "audio")


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


def test_audio_folder_reads_splits_and_skips_bad_files(tmp_path, capfd):
    rng = np.random.RandomState(0)
    soundfile.write(tmp_path / "a.wav", 0.3 * rng.randn(RATE), RATE)
    soundfile.write(tmp_path / "b.flac", 0.3 * rng.randn(2 * 44100, 2), 44100)  # stereo, another rate
    (tmp_path / "sub").mkdir()
    soundfile.write(tmp_path / "sub" / "c.ogg", 0.3 * rng.randn(RATE // 2), RATE)
    soundfile.write(tmp_path / "held_out.wav", 0.3 * rng.randn(RATE), RATE)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (tmp_path / "notes.txt").write_text("not audio")
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps({"audio_path": "held_out.wav", "caption": "noise", "split": "validation",
                            "extra": "ignored"}) + "\n")
    found = audio_tasks.scan_audio_folder(str(tmp_path), RATE)
    assert sorted(p.rsplit("/", 1)[-1] for p in found["train"]) == ["a.wav", "b.flac", "c.ogg"]
    assert [p.rsplit("/", 1)[-1] for p in found["validation"]] == ["held_out.wav"]
    assert "skipped 1 files" in capfd.readouterr().err
    name = raw_audio_task_name(RATE, str(tmp_path))
    with _pipeline(name, batch_size=3) as train:
        batch = next(train)["audio"]
    assert batch.shape == (3, 8000) and np.all(np.isfinite(batch))
    with _pipeline(name, split="validation", batch_size=1) as validation:
        assert next(validation)["audio"].shape == (1, 8000)


def test_bad_audio_dirs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        audio_tasks.scan_audio_folder(str(tmp_path / "missing"), RATE)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="no decodable audio files"):
        audio_tasks.scan_audio_folder(str(tmp_path), RATE)
    (tmp_path / "captions.jsonl").write_text("{broken json\n")
    soundfile.write(tmp_path / "ok.wav", np.zeros(100), RATE)
    with pytest.raises(ValueError, match="captions.jsonl:1: bad line"):
        audio_tasks.scan_audio_folder(str(tmp_path), RATE)
