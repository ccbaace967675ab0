"""Dataset preparation on Apache Beam (`python -m musiclm_jax.prepare --beam_pipeline_options ...`): the same
examples, order, splits and bad-input counts as the in-process build, reused by training's task, and the error
policy failing the pipeline with the file named."""
import json
import os
import subprocess
import sys

import pytest
import soundfile

from musiclm_jax.data import tfds_builders
from musiclm_jax.data.dataset_config import raw_audio_task_name
from musiclm_jax.tasks import audio as audio_tasks
from conftest import REPO_DIR, subprocess_env
from test_captioned_audio import _bad_folder, _musiccaps, _noise

RATE = 16000


def _examples(builder) -> dict:
    """{split: [(id, caption, aspects, audio bytes)]} in the prepared order."""
    out = {}
    for split in builder.info.splits:
        out[split] = [(ex["id"], ex["caption"], tuple(ex["aspects"]), ex["audio"].tobytes())
                      for ex in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()]
    return out


def test_beam_build_holds_the_in_process_build_and_its_skip_counts(tmp_path, monkeypatch):
    folder = tmp_path / "clips"
    folder.mkdir()
    expected = _bad_folder(folder)
    for i in range(12):  # enough training files for the held-out carve to run
        soundfile.write(folder / f"more{i:02d}.wav", _noise(0.3 + 0.05 * i, seed=i + 1), RATE)
    name = raw_audio_task_name(RATE, str(folder))
    in_process = audio_tasks.prepared_builder(name, str(tmp_path / "in_process"))

    beam_dir = tmp_path / "beam"
    out = subprocess.run(
        [sys.executable, "-m", "musiclm_jax.prepare", "--audio_dir", str(folder), "--sample_rates", str(RATE),
         "--data_dir", str(beam_dir),
         "--beam_pipeline_options", "direct_num_workers=2,direct_running_mode=multi_processing"],
        cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["reused"] is False and summary["splits"] == {
        split: info.num_examples for split, info in in_process.info.splits.items()}

    monkeypatch.setenv("MUSICLM_TFDS_DIR", str(beam_dir))
    beam_builder = audio_tasks.prepared_builder(name)  # what training's task reads: the Beam-prepared copy
    assert beam_builder.data_dir == summary["data_dir"]
    ours, theirs = in_process.info.metadata, beam_builder.info.metadata
    assert theirs["bad_input"]["skipped"] == ours["bad_input"]["skipped"] == {reason: 1 for reason in expected}
    assert theirs["bad_input"]["notes"] == ours["bad_input"]["notes"]
    assert summary["bad_input"]["skipped"] == ours["bad_input"]["skipped"]
    assert theirs["held_out"] == ours["held_out"]
    for reason, location in expected.items():  # skip messages name the file (or captions line)
        assert any(location in message for message in theirs["bad_input"]["examples"][reason]), reason
    beam_examples, in_process_examples = _examples(beam_builder), _examples(in_process)
    assert sum(len(v) for v in beam_examples.values()) == 16 and len(beam_examples["validation"]) >= 1
    assert beam_examples == in_process_examples  # same examples, same order, same split assignment


def test_musiccaps_on_beam_equals_its_in_process_build(tmp_path):
    """MusicCaps through Beam's in-process DirectRunner: the same examples (aspects included) and skip counts."""
    root = tmp_path / "musiccaps"
    root.mkdir()
    _, clips = _musiccaps(root)
    name = raw_audio_task_name(RATE, musiccaps_dir=str(root)) + f"?clips_dir={clips}"
    in_process = audio_tasks.prepared_builder(name, str(tmp_path / "in_process"))
    on_beam = audio_tasks.prepared_builder(name, str(tmp_path / "beam"),
                                           beam_options=tfds_builders.beam_options_from_flags("direct_num_workers=1"))
    assert on_beam.info.metadata["bad_input"]["skipped"] == in_process.info.metadata["bad_input"]["skipped"] == {
        "bad_csv_row": 2, "missing_clip": 1}
    assert _examples(on_beam) == _examples(in_process) and len(_examples(on_beam)["test"]) == 1


def test_beam_build_under_the_error_policy_names_the_bad_file(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    soundfile.write(folder / "good.wav", _noise(1.0), RATE)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio")
    name = raw_audio_task_name(RATE, str(folder), bad_input="error")
    with pytest.raises(Exception) as failure:  # Beam wraps the worker's BadInputError
        audio_tasks.prepared_builder(name, str(tmp_path / "tfds"),
                                     beam_options=tfds_builders.beam_options_from_flags("direct_num_workers=1"))
    assert "corrupt.wav" in str(failure.value) and "bad_input='error'" in str(failure.value)
    with pytest.raises(ValueError, match="nothing to prepare"):
        audio_tasks.prepared_builder(raw_audio_task_name(RATE))
    assert tfds_builders.beam_options_from_flags("") is None
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['direct_num_worker'\]"):
        tfds_builders.beam_options_from_flags("direct_num_worker=2")
    assert not any("dataset_info.json" in names for _, _, names in os.walk(tmp_path / "tfds"))  # nothing kept
